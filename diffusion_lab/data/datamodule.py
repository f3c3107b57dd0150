"""One LightningDataModule for every data source: split, batch, load; resumable mid-epoch; batches
of one aspect-ratio bucket each when the data set is bucketed (``data.buckets=true``)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from diffusion_lab.compat.lightning import batches_done_this_epoch
from diffusion_lab.data.buckets import bucket_batches
from diffusion_lab.utils.errors import ConfigError


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (a permutation seeded by ``seed + epoch``, one shard per rank) that
    can start mid-epoch: the first pass after a resume skips the ``start`` positions already
    trained on. Yields ``(epoch, index)`` so each item can seed its augmentation (``SeededItems``).

    Subclassing ``DistributedSampler`` keeps Lightning from wrapping it under DDP.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, epoch: int = 0, start: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.epoch = epoch
        self.start = start

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        super().set_epoch(epoch)

    def _indices(self) -> list[int]:
        """This rank's dataset indices for ``self.epoch``, in training order."""
        return list(super().__iter__())

    def __iter__(self):
        # a generator: runs at the first next(), after Lightning's set_epoch
        indices = self._indices()
        start, self.start = self.start, 0
        epoch = self.epoch
        for index in indices[start:]:
            yield epoch, index


class BucketSampler(ResumableSampler):
    """A ``ResumableSampler`` whose order comes in runs of ``batch_size`` (the per-device batch)
    from one aspect-ratio bucket each (``buckets.bucket_batches``: seeded by ``seed + epoch``, each
    rank its slice of every global batch), so the loader's consecutive batches never mix shapes.
    ``start`` (positions on this rank) resumes it as it does the plain sampler. ``shuffle=False``
    (validation on several ranks): the buckets in order."""

    def __init__(
        self,
        dataset: Dataset,
        bucket_ids: list[int],
        batch_size: int,
        num_replicas: int,
        rank: int,
        seed: int,
        epoch: int = 0,
        start: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, seed=seed, epoch=epoch, start=start)
        self.bucket_ids, self.batch_size, self.shuffle = list(bucket_ids), batch_size, shuffle

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch) if self.shuffle else None
        return bucket_batches(self.bucket_ids, self.batch_size, self.num_replicas, self.rank, generator)

    def _indices(self) -> list[int]:
        return [i for batch in self._batches() for i in batch]

    def __len__(self) -> int:
        return len(self._batches()) * self.batch_size  # padded: every batch is full


def bucket_ids_of(dataset: Dataset) -> list[int] | None:
    """The aspect-ratio bucket of each item (``ImageFolderDataset.bucket_ids``, through ``Subset``s),
    or None when the data is not bucketed."""
    if isinstance(dataset, Subset):
        ids = bucket_ids_of(dataset.dataset)
        return None if ids is None else [ids[i] for i in dataset.indices]
    return getattr(dataset, "bucket_ids", None)


class SeededItems(Dataset):
    """Takes ``(epoch, index)`` keys; seeds Python's and NumPy's global RNG from
    ``(seed, epoch, index)`` before building the item, so random crops/flips depend only on
    that key: not on worker count, prefetching, or where a run was resumed."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        state = np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]
        random.seed(int(state))
        np.random.seed(state)
        return self.dataset[index]


class ResumableLoader(DataLoader):
    """The training ``DataLoader``, marked resumable for Lightning (which otherwise warns "your
    dataloader is not resumable" on every mid-epoch resume). Its position needs no state of its
    own: ``DiffusionDataModule.load_state_dict`` runs before the loader is built, and the loader
    is built with a ``ResumableSampler`` that starts where the checkpoint stopped."""

    def state_dict(self) -> dict:
        return {}  # the position is in the datamodule's state (``DiffusionDataModule.state_dict``)

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class DiffusionDataModule(pl.LightningDataModule):
    """Wraps a built data set.

    Args:
        dataset: any ``Dataset`` of dicts with ``pixel_values``.
        batch_size: the *global* batch: each of the ``world_size`` processes loads
            ``batch_size // world_size`` (it must divide).
        val_fraction: held-out share for ``val/loss`` (a fixed, seeded split; 0 = no validation).
        seed: seed of that split.
        shuffle_seed: seed of the training order and augmentations; None = the run's ``seed``
            (``PL_GLOBAL_SEED``, the same on every DDP rank). Saved in checkpoints with the epoch
            and the position inside it, so a resumed run sees the same batches.
        caption_templates, caption_token: items without a caption get a prompt template (``object`` | ``style``
            | a list) filled with the token (``data/templates.py``: a few uncaptioned concept images).
        control: ``data.control``: each example also carries a control image computed from it
            (``edges`` | ``strokes`` | ``mask``, ``data/control.py``) for ``controlnet=``; None: none (or
            the data's own paired ``conditioning_image``).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
        shuffle_seed: int | None = None,
        control: str | None = None,
        caption_templates=None,
        caption_token: str | None = None,
    ) -> None:
        super().__init__()
        if caption_templates is not None:
            from diffusion_lab.data.templates import TemplateCaptions

            dataset = TemplateCaptions(dataset, caption_templates, caption_token)
        if control is not None:
            from diffusion_lab.data.control import check_control_kind

            check_control_kind(control)
        self.control = control
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed
        self.shuffle_seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if shuffle_seed is None else shuffle_seed
        self._resume: dict = {}
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def per_device_batch_size(self) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is the global batch and must divide by the number of "
                f"processes ({world} = trainer.devices x trainer.num_nodes); use e.g. data.batch_size="
                f"{max(world, self.batch_size // world * world)}."
            )
        return self.batch_size // world

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        n = len(self.dataset)
        n_val = int(round(n * self.val_fraction)) if self.val_fraction > 0 else 0
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.val_set = Subset(self.dataset, perm[:n_val]) if n_val else None
        self.train_set = Subset(self.dataset, perm[n_val:]) if n_val else self.dataset
        if self.control is not None:
            from diffusion_lab.data.control import ControlMaps

            self.train_set = ControlMaps(self.train_set, self.control)
            self.val_set = ControlMaps(self.val_set, self.control) if self.val_set is not None else None

    def _loader(self, ds: Dataset, sampler: ResumableSampler | None, drop_last: bool) -> DataLoader:
        return (ResumableLoader if sampler is not None else DataLoader)(
            ds,
            batch_size=self.per_device_batch_size,
            sampler=sampler,
            drop_last=drop_last and len(ds) >= self.per_device_batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            # its own generator: creating an iterator must not draw from the global RNG the
            # training step uses, or a resumed run would draw different noise
            generator=torch.Generator().manual_seed(self.shuffle_seed),
        )

    def _rank_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        position = dict(num_replicas=world, rank=rank, seed=self.shuffle_seed, epoch=self._resume.get("epoch", 0), start=self._resume.get("samples", 0) // world)
        buckets = bucket_ids_of(self.train_set)
        if buckets is None:
            sampler = ResumableSampler(self.train_set, **position)
        else:
            sampler = BucketSampler(self.train_set, buckets, self.per_device_batch_size, **position)
        self._resume = {}
        return self._loader(SeededItems(self.train_set, self.shuffle_seed), sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        buckets = bucket_ids_of(self.val_set)
        if buckets is None:
            return self._loader(self.val_set, sampler=None, drop_last=False)
        rank, world = self._rank_world()
        bs = self.per_device_batch_size
        keys = SeededItems(self.val_set, self.shuffle_seed)  # (epoch, index) keys, as in training
        # its own generator, as in _loader: a validation pass must not draw from the global RNG
        loader = dict(num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.persistent_workers,
                      generator=torch.Generator().manual_seed(self.shuffle_seed))
        if world == 1:  # each bucket whole, its last batch short: every item once
            batches = [[(0, i) for i in batch] for batch in bucket_batches(buckets, bs, pad=False)]
            return DataLoader(keys, batch_sampler=batches, **loader)
        # several ranks need equal shares: padded, and a DistributedSampler, so Lightning keeps it
        sampler = BucketSampler(self.val_set, buckets, bs, world, rank, self.shuffle_seed, shuffle=False)
        return DataLoader(keys, batch_size=bs, sampler=sampler, **loader)

    def state_dict(self) -> dict:
        """Where training is in the data (stored in every checkpoint): the shuffle seed, the epoch
        and how many samples of it (all ranks together) were trained on. Counted from Lightning's
        batch progress, not from the sampler, which runs ahead by the prefetched batches."""
        state = {"shuffle_seed": self.shuffle_seed}
        if self.trainer is not None:
            done = batches_done_this_epoch(self.trainer)
            state.update(epoch=self.trainer.current_epoch, samples=done * self.batch_size)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.shuffle_seed = state_dict.get("shuffle_seed", self.shuffle_seed)
        self._resume = dict(state_dict)

    def sample_batch(self, n: int) -> dict:
        """The first ``n`` training items as one batch (noising strips, conditioning for grids);
        bucketed data: the first ``n`` of the first item's bucket (one batch has one shape)."""
        self.setup()
        order = range(len(self.train_set))
        buckets = bucket_ids_of(self.train_set)
        if buckets is not None:
            order = [i for i in order if buckets[i] == buckets[0]]
        items = [self.train_set[i] for i in order[:n]]
        return torch.utils.data.default_collate(items)
