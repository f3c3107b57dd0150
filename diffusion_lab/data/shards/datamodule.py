"""``ShardDataModule``: trains on a shard set written by ``python -m diffusion_lab.prepare``."""

from __future__ import annotations

import os
import warnings

import pytorch_lightning as pl
import torch

from diffusion_lab.data.datamodule import DiffusionDataModule
from diffusion_lab.data.shards.manifest import Kind, check_shards_fit_model, count_items, read_manifest, split_dirs
from diffusion_lab.data.shards.reading import BucketedSplit, ShardItems, SplitByIndex, dataset_class, loader_class
from diffusion_lab.data.shards.store import S3Root, shard_root
from diffusion_lab.data.transforms import ImageTransform
from diffusion_lab.utils.errors import ConfigError


class ShardDataModule(pl.LightningDataModule):
    """Streams a shard set written by ``python -m diffusion_lab.prepare``: the interface of
    ``DiffusionDataModule`` (global ``batch_size``, ``per_device_batch_size``, ``dataset``,
    ``sample_batch``, a val loader, exact mid-epoch resume through ``state_dict``). Bucketed
    shards are read by index by an inner ``DiffusionDataModule`` (its ``BucketSampler``).

    Args:
        root: the shard set (``out_dir`` of prepare): a folder or ``s3://bucket/prefix``.
        transform: for pixel shards, applied to each stored image (``data.resolution`` / crop /
            flip); ignored for encoded shards, whose resolution must equal the prepared one.
        batch_size: the global batch (split over ``world_size`` processes, it must divide).
        num_workers: loader processes; litdata assigns chunks to (rank, worker), so an exact
            resume needs the same ``num_workers`` and number of processes.
        shuffle_seed: seed of litdata's shuffle and the augmentations; None = the run's seed.
        resolution, channels: ``data.resolution`` / ``data.channels``, checked against the shards.
        cache_dir, max_cache_size: for an ``s3://`` root, the local folder litdata caches the
            streamed chunks in and its cap (e.g. ``"50GB"``); None: litdata's, ``$LITDATA_CACHE_DIR``
            or ``~/.lightning/chunks``, up to 75% of the free disk. Ignored for folders.
    """

    def __init__(
        self,
        root: str,
        transform: ImageTransform | None = None,
        batch_size: int = 16,
        num_workers: int = 2,
        resolution: int | None = None,
        channels: int | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        shuffle_seed: int | None = None,
        cache_dir: str | None = None,
        max_cache_size: str | None = None,
    ) -> None:
        super().__init__()
        self.store = shard_root(root)
        self.manifest = read_manifest(self.store)
        self.root = self.store.url
        # object stores: where litdata caches the streamed chunks, and how much (None: litdata's defaults)
        self._remote = {"cache_dir": cache_dir, "max_cache_size": max_cache_size} if isinstance(self.store, S3Root) else None
        self.kind: Kind = self.manifest["kind"]
        self._check_shape(resolution, channels)
        self.transform = transform
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.shuffle_seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if shuffle_seed is None else shuffle_seed
        self._resume: dict = {}
        self._train_loader = None
        self._checked: torch.nn.Module | None = None
        self._bucketed: DiffusionDataModule | None = None
        if self.manifest.get("buckets"):
            self.dataset = self._indexed("train")
            self._bucketed = DiffusionDataModule(self.dataset, batch_size, num_workers, 0.0, pin_memory, persistent_workers, shuffle_seed=self.shuffle_seed)
            self._bucketed.train_set, self._bucketed.val_set = self.dataset, self._indexed("val")  # split at prepare time
        else:
            # random access (checks before fit, sample grids, noising strip): the training split in stored order
            self.dataset = self._streaming("train", shuffle=False)

    per_device_batch_size = DiffusionDataModule.per_device_batch_size

    def _check_shape(self, resolution: int | None, channels: int | None) -> None:
        stored = self.manifest
        what = "VAE latents of " if self.kind == "latents" else ""
        if channels is not None and channels != stored["channels"]:
            raise ConfigError(
                f"data.channels={channels} but the shards at {self.root} hold {what}{stored['channels']}-channel images; "
                f"set data.channels={stored['channels']}."
            )
        if resolution is None or resolution == stored["resolution"]:
            return
        if stored.get("buckets"):
            raise ConfigError(
                f"data.resolution={resolution} but the shards at {self.root} hold aspect buckets of ~{stored['resolution']}^2 px "
                f"({len(stored['buckets'])} sizes); set data.resolution={stored['resolution']}, or prepare again at data.resolution={resolution}."
            )
        if self.kind == "latents" or resolution > stored["resolution"]:
            fix = "" if self.kind == "latents" else " (or smaller: stored images are cropped to it)"
            raise ConfigError(
                f"data.resolution={resolution} but the shards at {self.root} hold {what}{stored['resolution']} px images; "
                f"set data.resolution={stored['resolution']}{fix}, or prepare again at data.resolution={resolution}."
            )

    def _streaming(self, split: str, shuffle: bool, bucketed: bool = False):
        items = ShardItems(self.transform, self.shuffle_seed, bucketed)
        remote = {}
        if self._remote is not None:
            remote = {k: v for k, v in self._remote.items() if v is not None} | {"allow_http": self.store.endpoint.startswith("http://")}
        return dataset_class()(self.store.join(split), items, shuffle=shuffle, seed=self.shuffle_seed, **remote)

    def _indexed(self, split: str) -> BucketedSplit | None:
        """A bucketed split read by index (None when the source had no such split)."""
        parts = split_dirs(self.store, split, self.manifest)
        if not parts:
            return None
        return BucketedSplit([(b, SplitByIndex(self._streaming(d, shuffle=False, bucketed=True), count_items(self.store, d))) for b, d in parts])

    def check_model(self, module: torch.nn.Module) -> None:
        """``ConfigError`` unless encoded shards were written by this module's VAE and text
        encoder (called by ``train.py`` before fit, and in ``setup``)."""
        if self._checked is not module:
            check_shards_fit_model(self.manifest, module, self.root)
            self._checked = module

    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        if trainer is None or getattr(trainer, "lightning_module", None) is None:
            return
        self.check_model(trainer.lightning_module)
        from diffusion_lab.callbacks.caching import LatentCacheCallback

        if any(isinstance(cb, LatentCacheCallback) and cb.enabled for cb in trainer.callbacks):
            raise ConfigError(
                "model.cache=true with data=shards: the in-RAM cache would read every shard into memory. Store the latents "
                "in the shards instead (python -m diffusion_lab.prepare prepare.encode=true model=...) and set model.cache=false."
            )

    def _loader(self, split: str, shuffle: bool):
        # built here, after the process group is up: litdata reads the rank and world size when it is
        # created. Training drops each stream's last partial batch, as DiffusionDataModule does.
        return loader_class()(
            self._streaming(split, shuffle),
            batch_size=self.per_device_batch_size,
            drop_last=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            # its own generator: creating an iterator must not draw from the global RNG the training
            # step uses, or a resumed run (which creates one mid-epoch) would draw different noise
            generator=torch.Generator().manual_seed(self.shuffle_seed),
        )

    def _inner(self) -> DiffusionDataModule:
        """The bucketed data's ``DiffusionDataModule``, told this module's trainer, seed and resume point."""
        inner = self._bucketed
        inner.trainer, inner.shuffle_seed = self.trainer, self.shuffle_seed
        inner._resume, self._resume = self._resume or inner._resume, {}
        return inner

    def train_dataloader(self):
        if self._bucketed is not None:
            return self._inner().train_dataloader()
        # litdata gives each (rank, worker) its own chunks, so the length Lightning warns about is right
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        loader = self._loader("train", shuffle=True)
        if self._resume:
            batches = self._resume.get("samples", 0) // self.batch_size
            if batches and "loader" not in self._resume:
                raise ConfigError(
                    f"ckpt_path: the checkpoint stops {batches} batches into epoch {self._resume.get('epoch', 0)} of the shards at "
                    f"{self.root}, but holds no litdata loader state (it was written by an older diffusion_lab, which kept only "
                    f"that count). Resume it with the diffusion_lab version that wrote it, or from a checkpoint of this version."
                )
            loader.resume(self._resume.get("epoch", 0), batches, self._resume.get("loader"))
        self._resume = {}
        self._train_loader = loader
        return loader

    def val_dataloader(self):
        if self._bucketed is not None:
            return self._inner().val_dataloader()
        if not self.store.is_file("val", "index.json"):
            return []
        # read by global index like a map-style data set, so Lightning's DistributedSampler splits
        # it over ranks: litdata splits by chunk, and a small val split has fewer chunks than ranks
        # DiffusionDataModule's loader: its own generator, so a validation pass draws nothing from the
        # global RNG (a checkpoint is written before its step's validation; a resumed run must match)
        return DiffusionDataModule._loader(self, SplitByIndex(self._streaming("val", shuffle=False), count_items(self.store, "val")), sampler=None, drop_last=False)

    def state_dict(self) -> dict:
        """The shuffle seed, the epoch and how many samples of it (all ranks together) were trained
        on, counted from Lightning's batch progress (as ``DiffusionDataModule.state_dict``); mid-epoch,
        also ``loader``: litdata's loader state at that batch (``ShardLoader.position``)."""
        state = DiffusionDataModule.state_dict(self)
        batches = state.get("samples", 0) // self.batch_size
        if self._bucketed is None and batches and self._train_loader is not None:
            position = self._train_loader.position(state["epoch"], batches)
            if position is None:  # fit ended; Lightning counts the next epoch, not begun
                state["samples"] = 0
            else:
                state["loader"] = position
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.shuffle_seed = state_dict.get("shuffle_seed", self.shuffle_seed)
        self._resume = dict(state_dict)

    def sample_batch(self, n: int) -> dict:
        """The first ``n`` stored training items as one batch (noising strips, grid conditioning);
        bucketed: of the first bucket."""
        if self._bucketed is not None:
            return self._inner().sample_batch(n)
        items = [self.dataset[i] for i in range(min(n, len(self.dataset)))]
        return torch.utils.data.default_collate(items)
