"""Latent caching (``model.cache=true``): VAE posteriors and frozen text states, computed once.

At the start of ``fit`` the datamodule's train/val sets are replaced by ``CachedLatentDataset``s
(``data/caching.py``) holding each image's posterior (mean, logvar) and the text states of each
distinct caption; the module's ``encode``/``conditioning`` read them from the batch. The latent is
still drawn fresh each step from the cached posterior, so a cached run is the same run.
"""

from __future__ import annotations

import warnings

import pytorch_lightning as pl

from diffusion_lab.data.caching import CachedLatentDataset, cache_latents, cacheable_text_fn
from diffusion_lab.utils.errors import ConfigError


class LatentCacheCallback(pl.Callback):
    """Swap the data sets for cached ones when ``enabled`` (linked to ``model.cache``).

    Text states are cached only while every text encoder is frozen (a trained encoder changes)."""

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self.enabled:
            return
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "train_set"):
            raise ConfigError("model.cache=true needs the data module of data.datamodule (diffusion_lab.data.DiffusionDataModule).")
        _warn_if_random_transform(dm.train_set)
        base = getattr(dm.train_set, "dataset", dm.train_set)  # a Subset of the split
        if getattr(base, "bucket_ids", None) is not None:
            raise ConfigError(
                "model.cache=true with data.buckets=true: the latent cache holds latents of one shape, and bucketed "
                "images have several. Set model.cache=false (the VAE then runs every step) or data.buckets=false."
            )
        text_fn = cacheable_text_fn(pl_module)
        # the module's per-image entries, and the data's paired images / loss masks (small: kept as they are)
        keep = (*getattr(pl_module, "cached_batch_keys", ()), *getattr(base, "paired_keys", ()))
        states_dir = getattr(pl_module, "cache_states_dir", None)  # SD3/Flux model.cache_text_dir: T5 states on disk
        for name in ("train_set", "val_set"):
            ds = getattr(dm, name)
            if ds is not None and not isinstance(ds, CachedLatentDataset):
                disk = {"states_dir": f"{states_dir}/{name}.rank{trainer.global_rank}"} if states_dir and text_fn else {}
                setattr(dm, name, cache_latents(ds, pl_module.codec.moments, text_fn, pl_module.device, dm.per_device_batch_size, keep=keep, **disk))


def _warn_if_random_transform(dataset) -> None:
    base = getattr(dataset, "dataset", dataset)  # a Subset of the split
    transform = getattr(base, "transform", None)
    if getattr(transform, "crop", "center") == "random" or getattr(transform, "random_flip", False):
        warnings.warn(
            "model.cache=true with random crops/flips: the cache holds one crop/flip per image, so training sees "
            "less augmentation than without it (set data.crop=center data.random_flip=false, or model.cache=false).",
            stacklevel=2,
        )
