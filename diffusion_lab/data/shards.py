"""Sharded, streamed training data on litdata (Lightning's streaming engine): written once by
``python -m diffusion_lab.prepare``, read by ``data=shards`` without holding the data in memory.

A shard set is a folder::

    <root>/shards.json     the manifest: what was written, from which data config (and model)
    <root>/train/          litdata chunks + index.json (``litdata.optimize``)
    <root>/val/            the held-out split of the source config (absent when it had none)

Aspect-bucketed sources (``data=image_folder data.buckets=true``) are written one litdata folder
per bucket (``train/<h>x<w>/``) and read by index through ``BucketSampler``: batches never mix
shapes, as with the folder itself.

Each sample is a dict: ``index`` (its position in the source split) and either ``image`` (PNG
bytes of the source transform's output, lossless) or, for encoded shards, ``latent_moments``
``[2c, h, w]`` and the frozen text states (``encoder_hidden_states`` ``[L, D]``, SDXL also
``text_embeds`` ``[D']``); plus ``label`` / ``caption`` / other per-item values of the source.
Sharding across ranks and workers, shuffling (chunks, then items inside a window of chunks) and
resume replay are litdata's; this module decodes items and keeps the run's position in the data.
Bucketed shards are read by global index instead (``StreamingDataset[i]``), in the order of the
same ``BucketSampler`` that ``DiffusionDataModule`` uses for bucketed folders.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset

from diffusion_lab.data.datamodule import DiffusionDataModule, bucket_ids_of
from diffusion_lab.data.sources import MASK_KEY
from diffusion_lab.data.transforms import ImageTransform, to_pil, to_uint8
from diffusion_lab.utils.errors import ConfigError, DataError

MANIFEST = "shards.json"
FORMAT_VERSION = 1
Kind = Literal["pixels", "latents"]


def _litdata():
    try:
        import litdata
    except ImportError as e:  # pragma: no cover - an install without it
        raise ConfigError(
            "data=shards and python -m diffusion_lab.prepare need litdata: pip install --no-deps 'litdata>=0.2.76,<0.3' "
            "boto3 obstore tifffile (--no-deps: its torchvision requirement would pull a CUDA torchvision that breaks a CPU torch)."
        ) from e
    return litdata


# ---- identity of the frozen parts, manifest -----------------------------------------------------
def fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and values): which frozen VAE or text
    encoder the stored latents / states came from."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_manifest(root: str | Path) -> dict:
    """The manifest of the shard set at ``root``; a ``DataError`` that says what ``root`` is
    instead when it is not a complete shard set."""
    if "://" in str(root):
        raise ConfigError(
            f"data.root={root}: object-store roots are not supported yet (litdata could stream them, but the manifest and "
            f"indexes are read from a filesystem). Mount the bucket (e.g. mountpoint-s3, gcsfuse, s3fs) and set data.root to the "
            f"mounted folder, or copy the shard set to shared storage."
        )
    root = Path(root).expanduser()
    path = root / MANIFEST
    if not root.is_dir():
        unfinished = sorted(root.parent.glob(f".{root.name}.tmp-*")) if root.parent.is_dir() else []
        hint = f" An unfinished prepare left {unfinished[0]} (prepare was interrupted: run it again)." if unfinished else ""
        raise DataError(f"data.root={str(root)!r} does not exist.{hint} Write a shard set there with python -m diffusion_lab.prepare data=<source> out_dir={root}.")
    if not path.is_file():
        images = any(p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") for p in root.iterdir())
        hint = " It holds images: train on them with data=image_folder, or write shards from them first." if images else ""
        raise DataError(
            f"data.root={str(root)!r} is not a shard set (no {MANIFEST}, which python -m diffusion_lab.prepare writes "
            f"last, once every shard is complete).{hint} Run: python -m diffusion_lab.prepare data=image_folder "
            f"data.root=<images> out_dir={root}."
        )
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path} is not JSON ({e}); the shard set is damaged: write it again with python -m diffusion_lab.prepare.") from e
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("kind") not in ("pixels", "latents"):
        raise DataError(f"{path} is not a diffusion_lab shard manifest of format {FORMAT_VERSION}; write the shards again with this version's python -m diffusion_lab.prepare.")
    if not split_dirs(root / "train", manifest):
        raise DataError(f"{root}/train has no litdata index.json: the shard set is incomplete; write it again with python -m diffusion_lab.prepare.")
    return manifest


def split_dirs(split_dir: Path, manifest: dict) -> list[tuple[int, Path]]:
    """``(bucket id, litdata folder)`` of each part of a split: ``[(0, split_dir)]``, or for
    bucketed shards one folder ``<h>x<w>`` per bucket of ``manifest["buckets"]`` that has items."""
    if not manifest.get("buckets"):
        return [(0, split_dir)] if (split_dir / "index.json").is_file() else []
    parts = [(b, split_dir / f"{h}x{w}") for b, (h, w) in enumerate(manifest["buckets"])]
    return [(b, d) for b, d in parts if (d / "index.json").is_file()]


def model_identity(module: torch.nn.Module, text_states: bool) -> dict:
    """What encoded shards depend on: the VAE's fingerprint and, when text states are stored,
    the text conditioner's (``model_identity`` of the training module must match)."""
    return {
        "family": getattr(module, "family", type(module).__name__),
        "module": f"{type(module).__module__}.{type(module).__qualname__}",
        "vae": fingerprint(module.codec),
        "text_encoder": fingerprint(module.conditioner) if text_states else None,
        "text_keys": list(module.text_keys) if text_states else [],
    }


def check_shards_fit_model(manifest: dict, module: torch.nn.Module, root: str) -> None:
    """``ConfigError`` when encoded shards were written for another model than ``module``."""
    from diffusion_lab.components.vae import IdentityCodec

    if manifest["kind"] != "latents":
        return
    stored = manifest["model"]
    codec = getattr(module, "codec", None)
    if codec is None or isinstance(codec, IdentityCodec):
        raise ConfigError(
            f"data.root={root} holds VAE latents (encoded for model={stored['family']}) but this model has no VAE "
            f"({type(module).__name__}); train a latent model on it, or prepare pixel shards (prepare.encode=false)."
        )
    if fingerprint(codec) != stored["vae"]:
        raise ConfigError(
            f"data.root={root} was encoded with another VAE (shards.json: vae {stored['vae'][:12]}, config {stored.get('vae_config')}) "
            f"than this run's vae= ({fingerprint(codec)[:12]}); its latents would be wrong for this model. Use the model "
            f"config it was prepared with, or prepare again: python -m diffusion_lab.prepare prepare.encode=true model=... out_dir=<new>."
        )
    if stored["text_keys"]:
        conditioner = module.conditioner
        if not conditioner.frozen:
            raise ConfigError(
                f"data.root={root} stores frozen text-encoder states, but this run trains the text encoder "
                f"(text_encoder.trainable / adapter text LoRA), so they would be stale. Prepare with prepare.text_states=false "
                f"(captions only) or keep the text encoder frozen."
            )
        if fingerprint(conditioner) != stored["text_encoder"] or list(module.text_keys) != stored["text_keys"]:
            raise ConfigError(
                f"data.root={root} stores text states of another text encoder (shards.json: {stored['text_encoder'][:12]}, "
                f"{stored.get('text_encoder_config')}) than this run's text_encoder=; use the model config it was prepared "
                f"with, or prepare again with this one."
            )


# ---- items -----------------------------------------------------------------------------------
def encode_png(pixel_values: torch.Tensor) -> bytes:
    """``[C, H, W]`` in [-1, 1] -> PNG bytes (lossless: the transform's output is uint8-valued)."""
    buf = io.BytesIO()
    to_pil(pixel_values[None])[0].save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class ShardItems:
    """A stored sample -> a training item. Pixel samples: the PNG through ``transform`` (random
    crops/flips seeded by ``(seed, epoch, index)``, so they do not depend on workers or resume).
    The stored paired images and loss mask of the sample get the image's crop and flip.
    ``bucketed``: images keep their stored size (their bucket; only flips), drawn from Python's
    global RNG, which ``SeededItems`` seeds per ``(epoch, index)``. Encoded samples pass through,
    their float16 tensors (``prepare.store_dtype=float16``) read back as float32."""

    def __init__(self, transform: ImageTransform | None, seed: int, bucketed: bool = False) -> None:
        self.transform = transform
        self.seed = seed
        self.bucketed = bucketed

    def __call__(self, sample: dict, epoch: int) -> dict:
        item = dict(sample)
        png = item.pop("image", None)
        if png is None:
            return {k: v.float() if torch.is_tensor(v) and v.dtype == torch.float16 else v for k, v in item.items()}
        rng = None if self.bucketed else random.Random(int(np.random.SeedSequence([self.seed, epoch, int(item["index"])]).generate_state(1)[0]))
        with Image.open(io.BytesIO(png)) as im:
            geometry = self.transform.draw(im.size, rng, size=(im.height, im.width) if self.bucketed else None)
            item["pixel_values"] = self.transform.apply(im, geometry)
        if geometry.size == geometry.original_size and not geometry.flip:
            return item  # stored at the training size, not flipped: the paired values as stored
        for key, value in sample.items():  # stored aligned with the image (paired images, mask)
            if torch.is_tensor(value) and value.ndim == 3 and tuple(value.shape[1:]) == geometry.original_size:
                if key == MASK_KEY:
                    item[key] = self.transform.apply_mask(Image.fromarray(to_uint8(value * 2 - 1)[0].numpy(), "L"), geometry)
                else:
                    item[key] = self.transform.apply(to_pil(value[None])[0], geometry)
        return item


class SplitByIndex(Dataset):
    """The items ``0..n-1`` of a streaming split by their global index (``StreamingDataset[i]``)."""

    def __init__(self, streaming, n: int) -> None:
        self.streaming, self.n = streaming, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.streaming[int(i)]


class BucketedSplit(ConcatDataset):
    """A bucketed split by global index: its buckets' parts (``(bucket id, SplitByIndex)``) one
    after another. ``bucket_ids`` is what ``BucketSampler`` batches by: with the sampler's index
    lists, a few integers per item are all it keeps in memory."""

    def __init__(self, parts: list[tuple[int, SplitByIndex]]) -> None:
        super().__init__([split for _, split in parts])
        self.bucket_ids = [b for b, split in parts for _ in range(len(split))]


def _dataset_class():
    StreamingDataset = _litdata().StreamingDataset

    class ShardDataset(StreamingDataset):
        """litdata's ``StreamingDataset`` whose items go through ``items`` (with litdata's epoch)."""

        def __init__(self, input_dir: str, items: ShardItems, **kwargs) -> None:
            super().__init__(input_dir, **kwargs)
            self.items = items

        def __getitem__(self, index):
            return self.items(super().__getitem__(index), int(self.current_epoch))

    return ShardDataset


def _loader_class():
    StreamingDataLoader = _litdata().StreamingDataLoader

    class ShardLoader(StreamingDataLoader):
        """litdata's ``StreamingDataLoader``; Lightning's own loader-state saving is switched off
        (``state_dict`` is empty): the loader runs ahead of training by Lightning's prefetched
        batch, so the position is kept by the datamodule and replayed with ``resume``."""

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state_dict: dict) -> None:
            pass

        def __iter__(self):
            # litdata keeps replaying a restored position until one epoch runs to its end, but Lightning
            # ends an epoch after len(loader) batches without exhausting the iterator: once the resumed
            # epoch has started, the next one must start afresh (a new shuffle, every chunk).
            if getattr(self, "_resumed_epoch_started", False):
                self.restore = self._resumed_epoch_started = False
            if self.restore:
                self._resumed_epoch_started = True
            yield from super().__iter__()

        def resume(self, epoch: int, batches: int, world_size: int) -> None:
            """Continue Lightning epoch ``epoch`` after this rank's first ``batches`` batches (litdata
            replays its shuffle and skips them in each worker)."""
            if batches <= 0:
                self.current_epoch = epoch  # __iter__ adds one: litdata counts epochs from 1
                return
            state = super().state_dict()
            samples = batches * self.batch_size
            state.update(current_epoch=epoch + 1, num_samples_yielded=samples, latest_worker_idx=(batches - 1) % max(self.num_workers, 1))
            state["dataset"].update(current_epoch=epoch + 1, num_samples_yielded=samples, sample_in_epoch=samples * world_size)
            super().load_state_dict(state)

    return ShardLoader


# ---- the data module -------------------------------------------------------------------------
class ShardDataModule(pl.LightningDataModule):
    """Streams a shard set written by ``python -m diffusion_lab.prepare``: the interface of
    ``DiffusionDataModule`` (global ``batch_size``, ``per_device_batch_size``, ``dataset``,
    ``sample_batch``, a val loader, exact mid-epoch resume through ``state_dict``). Bucketed
    shards are read by index by an inner ``DiffusionDataModule`` (its ``BucketSampler``).

    Args:
        root: the shard set (``out_dir`` of prepare).
        transform: for pixel shards, applied to each stored image (``data.resolution`` / crop /
            flip); ignored for encoded shards, whose resolution must equal the prepared one.
        batch_size: the global batch (split over ``world_size`` processes, it must divide).
        num_workers: loader processes; litdata assigns chunks to (rank, worker), so an exact
            resume needs the same ``num_workers`` and number of processes.
        shuffle_seed: seed of litdata's shuffle and the augmentations; None = the run's seed.
        resolution, channels: ``data.resolution`` / ``data.channels``, checked against the shards.
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
    ) -> None:
        super().__init__()
        self.manifest = read_manifest(root)
        self.root = str(Path(root).expanduser())
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

    def _streaming(self, split: str | Path, shuffle: bool, bucketed: bool = False):
        items = ShardItems(self.transform, self.shuffle_seed, bucketed)
        return _dataset_class()(str(Path(self.root) / split), items, shuffle=shuffle, seed=self.shuffle_seed)

    def _indexed(self, split: str) -> BucketedSplit | None:
        """A bucketed split read by index (None when the source had no such split)."""
        parts = split_dirs(Path(self.root) / split, self.manifest)
        if not parts:
            return None
        return BucketedSplit([(b, SplitByIndex(self._streaming(d, shuffle=False, bucketed=True), _count(d))) for b, d in parts])

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
        return _loader_class()(
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
            world = self.trainer.world_size if self.trainer is not None else 1
            loader.resume(self._resume.get("epoch", 0), self._resume.get("samples", 0) // self.batch_size, world)
        self._resume = {}
        self._train_loader = loader
        return loader

    def val_dataloader(self):
        if self._bucketed is not None:
            return self._inner().val_dataloader()
        split = Path(self.root) / "val"
        if not (split / "index.json").is_file():
            return []
        # read by global index like a map-style data set, so Lightning's DistributedSampler splits
        # it over ranks: litdata splits by chunk, and a small val split has fewer chunks than ranks
        # DiffusionDataModule's loader: its own generator, so a validation pass draws nothing from the
        # global RNG (a checkpoint is written before its step's validation; a resumed run must match)
        return DiffusionDataModule._loader(self, SplitByIndex(self._streaming("val", shuffle=False), _count(split)), sampler=None, drop_last=False)

    def state_dict(self) -> dict:
        """The shuffle seed, the epoch and how many samples of it (all ranks together) were trained
        on, counted from Lightning's batch progress (as ``DiffusionDataModule.state_dict``)."""
        return DiffusionDataModule.state_dict(self)

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


# ---- writing ---------------------------------------------------------------------------------
def item_name(dataset: Dataset, i: int) -> str:
    """The file behind item ``i`` (through splits and concatenations), for error messages."""
    while True:
        if isinstance(dataset, Subset):
            dataset, i = dataset.dataset, int(dataset.indices[i])
        elif isinstance(dataset, ConcatDataset):
            k = int(np.searchsorted(dataset.cumulative_sizes, i, side="right"))
            dataset, i = dataset.datasets[k], i - (dataset.cumulative_sizes[k - 1] if k else 0)
        else:
            break
    files = getattr(dataset, "files", None)
    return str(files[i]) if files is not None else f"item {i} of {type(dataset).__name__}"


def _plain(value: Any) -> Any:
    """A per-item value as litdata stores it (tensors, ints, floats, strings)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


class ShardWriter:
    """The function ``litdata.optimize`` runs in each worker process over batches of indices of
    ``dataset``: yields one sample per readable item. Unreadable items are skipped (listed in
    ``log_dir``) or, with ``on_bad_image=fail``, recorded there so that ``write_shards`` raises
    (an exception inside a litdata worker would hang the job)."""

    def __init__(
        self, dataset: Dataset, log_dir: str, on_bad_image: Literal["fail", "skip"], module: torch.nn.Module | None = None,
        text_states: bool = True, device: str = "cpu", store_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.dataset, self.log_dir, self.on_bad_image = dataset, Path(log_dir), on_bad_image
        self.module, self.text_states, self.device, self.store_dtype = module, text_states, device, store_dtype

    def _log(self, kind: str, line: str) -> None:
        with open(self.log_dir / f"{kind}-{os.getpid()}.txt", "a") as f:
            f.write(line.replace("\n", " ") + "\n")

    def _failed(self) -> bool:
        return any(self.log_dir.glob("failed-*.txt"))

    @torch.no_grad()
    def __call__(self, indices: list[int]):
        if self._failed():
            return  # another worker found a bad image: stop early, the job fails
        items = []
        for i in indices:
            try:
                items.append((i, self.dataset[i]))
            except Exception as e:  # PIL raises many types for truncated/garbage files
                self._log("skipped" if self.on_bad_image == "skip" else "failed", f"{item_name(self.dataset, i)}\t{type(e).__name__}: {e}")
                if self.on_bad_image != "skip":
                    return
        if not items:
            return
        encoded = self._encode([item for _, item in items]) if self.module is not None else None
        for k, (i, item) in enumerate(items):
            sample: dict = {"index": int(i)}
            for key, value in item.items():
                if key == "pixel_values":
                    if encoded is None:
                        sample["image"] = encode_png(value)
                else:
                    sample[key] = _plain(value)
            if encoded is not None:
                sample.update({key: v[k] for key, v in encoded.items()})
            yield sample

    def _encode(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """The VAE posterior of each image (and the frozen text states of each caption): what the
        module computes from a batch, so training reads ``latent_moments`` and the text states
        (stored as ``store_dtype``)."""
        module = self.module.to(self.device)
        pixels = torch.stack([item["pixel_values"] for item in items]).to(self.device)
        out = {"latent_moments": module.codec.moments(pixels)}
        if self.text_states and "caption" in items[0]:
            out.update(module.text_states([item["caption"] for item in items]))
        return {k: v.to("cpu", self.store_dtype) for k, v in out.items()}


def _parts(dataset: Dataset, bucket_sizes: list[tuple[int, int]] | None) -> list[tuple[tuple[int, int] | None, list[int]]]:
    """``(bucket size, indices)`` groups of ``dataset`` to write: one group of every index, or one
    per aspect bucket when its items have ``bucket_ids``."""
    ids = bucket_ids_of(dataset)
    if ids is None:
        return [(None, list(range(len(dataset))))]
    if bucket_sizes is None:
        raise ValueError("bucketed items need bucket_sizes")
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(ids):
        groups.setdefault(int(b), []).append(i)
    return [(tuple(bucket_sizes[b]), idx) for b, idx in sorted(groups.items())]


def _count(split_dir: Path) -> int:
    index = json.loads((split_dir / "index.json").read_text())
    return sum(chunk["chunk_size"] for chunk in index["chunks"])


def write_shards(
    splits: dict[str, Dataset | None],
    out_dir: str | Path,
    source: dict,
    resolution: int,
    channels: int,
    module: torch.nn.Module | None = None,
    model_config: dict | None = None,
    text_states: bool = True,
    num_workers: int = 2,
    batch_size: int = 16,
    chunk_bytes: str | None = "64MB",
    chunk_size: int | None = None,
    on_bad_image: Literal["fail", "skip"] = "fail",
    device: str = "cpu",
    overwrite: bool = False,
    bucket_sizes: list[tuple[int, int]] | None = None,
    store_dtype: Literal["float32", "float16"] = "float32",
) -> dict:
    """Write ``splits`` (``{"train": ds, "val": ds | None}``, datasets of the usual item dicts) as
    a shard set at ``out_dir``, built in a temp folder beside it and renamed into place once
    complete with its manifest (a killed job leaves no shard set that looks whole). With
    ``module`` (a latent model), stores VAE posteriors and, with ``text_states``, frozen text
    states instead of pixels. Items with aspect buckets (``bucket_ids``; ``bucket_sizes`` their
    ``(h, w)``) are written one folder per bucket, ``<split>/<h>x<w>/``. ``store_dtype=float16``
    halves the disk of encoded latents and text states. Returns the manifest."""
    from diffusion_lab.components.vae import IdentityCodec
    from diffusion_lab.utils.io import atomic_dir

    optimize = _litdata().optimize
    out_dir = Path(out_dir).expanduser()
    if "://" in str(out_dir):
        raise ConfigError(f"out_dir={out_dir} must be a local (or mounted shared) folder: shards are written beside it and renamed into place.")
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"out_dir={out_dir} exists; pick another folder or set prepare.overwrite=true to replace it (the old one stays until the new one is complete).")
    kind: Kind = "pixels"
    if module is not None:
        if isinstance(getattr(module, "codec", None), IdentityCodec) or not hasattr(module, "codec"):
            raise ConfigError("prepare.encode=true stores VAE latents: it needs a latent model (model=latent_sd / latent_sdxl with a vae=), not a pixel model; or set prepare.encode=false.")
        kind = "latents"
        text_states = text_states and hasattr(module, "text_states") and module.conditioner.frozen
        module.eval()
    if store_dtype not in ("float32", "float16"):  # litdata cannot store bfloat16
        raise ConfigError(f"prepare.store_dtype={store_dtype!r}: use float32 or float16 (half the disk for encoded latents and text states).")
    manifest: dict = {"format_version": FORMAT_VERSION, "kind": kind, "resolution": resolution, "channels": channels, "source": source, "num_items": {}, "skipped": []}
    if module is not None:
        manifest["model"] = model_identity(module, text_states) | (model_config or {})
        manifest["store_dtype"] = store_dtype
    parts = {split: _parts(ds, bucket_sizes) for split, ds in splits.items() if ds is not None and len(ds)}
    used = sorted({size for groups in parts.values() for size, _ in groups if size})
    if used:
        manifest["buckets"] = [list(size) for size in used]
    with atomic_dir(out_dir) as tmp:
        log_dir = Path(tmp) / "log"
        log_dir.mkdir()
        for split, groups in parts.items():
            writer = ShardWriter(splits[split], str(log_dir), on_bad_image, module, text_states, device, getattr(torch, store_dtype))
            manifest["num_items"][split] = 0
            for size, inputs in groups:
                dest = Path(tmp) / split / (f"{size[0]}x{size[1]}" if size else "")
                workers = max(1, min(num_workers, -(-len(inputs) // batch_size)))
                print(f"writing {len(inputs)} {split} items to {out_dir}/{dest.relative_to(tmp)} ({kind}, {workers} worker processes)", flush=True)
                optimize(
                    writer, inputs, str(dest), batch_size=batch_size, num_workers=workers,
                    **({"chunk_size": chunk_size} if chunk_size else {"chunk_bytes": chunk_bytes}),
                    keep_data_ordered=True, reorder_files=False, start_method="fork", verbose=True,
                )
                failed = sorted(log_dir.glob("failed-*.txt"))
                if failed:
                    name, why = failed[0].read_text().splitlines()[0].split("\t", 1)
                    raise DataError(
                        f"cannot read image {name}: {why}. The file is truncated or not an image. Delete or replace it, or set "
                        f"prepare.on_bad_image=skip (data.on_bad_image=skip) to skip unreadable files; nothing was written to {out_dir}."
                    )
                if (dest / "index.json").is_file():  # every item of a group can have been skipped
                    manifest["num_items"][split] += _count(dest)
        skipped = [line.split("\t")[0] for f in sorted(log_dir.glob("skipped-*.txt")) for line in f.read_text().splitlines()]
        manifest["skipped"] = [str(p) for p in source.pop("_skipped", [])] + skipped
        if manifest["skipped"]:
            warnings.warn(f"skipped {len(manifest['skipped'])} unreadable image(s) (first: {manifest['skipped'][0]}); listed in {out_dir}/{MANIFEST}", stacklevel=2)
        shutil.rmtree(log_dir)
        (Path(tmp) / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))  # last: marks the set complete
    return manifest


__all__ = ["MANIFEST", "ShardDataModule", "ShardItems", "ShardWriter", "check_shards_fit_model", "fingerprint", "read_manifest", "write_shards"]
