"""Aspect-ratio buckets (``data.buckets=true``): images keep their shape, batches keep one shape.

Each image goes to the bucket whose aspect ratio is nearest its own (diffusers'
``find_nearest_bucket``); the buckets are diffusers' ``generate_aspect_ratio_buckets`` ladder of
about ``resolution**2`` pixels with sides a multiple of ``step`` (or an explicit list), and the
image is resized and cropped to its bucket. ``bucket_batches`` groups one epoch into batches that
never mix buckets, the same on every DDP rank, each rank taking its own slice of each batch.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
from diffusers.training_utils import find_nearest_bucket, generate_aspect_ratio_buckets, parse_buckets_string

from diffusion_lab.utils.errors import ConfigError


class AspectBuckets:
    """The bucket sizes ``(h, w)`` and which one an image of a given size goes to.

    Args:
        resolution: the pixel budget is ``resolution**2`` (``data.resolution``).
        step: every side is a multiple of it: the VAE factor x the UNet's down-sampling (SD: 8 x 8).
        sizes: explicit buckets instead of the ladder: ``"h,w;h,w"`` (``parse_buckets_string``) or
            a list of ``[h, w]``.
    """

    def __init__(self, resolution: int, step: int = 64, sizes: str | Sequence[Sequence[int]] | None = None) -> None:
        if sizes is None:
            if step <= 0 or step > resolution:
                raise ConfigError(f"data.bucket_step={step} must be in 1..data.resolution={resolution} (bucket sides are multiples of it).")
            self.sizes = [tuple(s) for s in generate_aspect_ratio_buckets(resolution, divisibility=step)]
        else:
            try:
                self.sizes = parse_buckets_string(sizes) if isinstance(sizes, str) else [(int(h), int(w)) for h, w in sizes]
            except (ValueError, TypeError) as e:
                raise ConfigError(f"data.bucket_sizes={sizes!r}: {e}. Write it as \"h,w;h,w\", e.g. \"512,512;448,576;576,448\".") from e
            bad = [s for s in self.sizes if s[0] % step or s[1] % step]
            if bad:
                raise ConfigError(f"data.bucket_sizes has {bad}, not multiples of data.bucket_step={step} (the VAE factor x the UNet's down-sampling); round them.")
        self.resolution, self.step = resolution, step

    def __len__(self) -> int:
        return len(self.sizes)

    def nearest(self, h: int, w: int) -> int:
        """Index of the bucket nearest the aspect ratio of an ``h`` x ``w`` image."""
        return find_nearest_bucket(h, w, self.sizes)

    def describe(self, ids: Sequence[int]) -> str:
        """``"512x512: 10, 448x576: 3"``: images per bucket (``h x w``), the fullest first."""
        return ", ".join(f"{self.sizes[b][0]}x{self.sizes[b][1]}: {n}" for b, n in Counter(ids).most_common())


def aspect_buckets(enabled: bool, resolution: int, step: int = 64, sizes: str | Sequence[Sequence[int]] | None = None) -> AspectBuckets | None:
    """``AspectBuckets`` when ``enabled`` (``data.buckets``), else None (square crops)."""
    return AspectBuckets(resolution, step, sizes) if enabled else None


def bucket_batches(
    bucket_ids: Sequence[int],
    batch_size: int,
    num_replicas: int = 1,
    rank: int = 0,
    generator: torch.Generator | None = None,
    pad: bool = True,
) -> list[list[int]]:
    """One epoch of this rank's batches (dataset indices, ``batch_size`` per rank).

    The indices of each bucket are shuffled with ``generator`` (None: in order) and cut into global
    batches of ``batch_size * num_replicas``; the batch order is then shuffled too. A bucket's last,
    short global batch is filled up with its own first indices (``pad``, as ``DistributedSampler``
    pads), so no image is dropped and every rank gets the same number of batches; with
    ``pad=False`` (one process) it stays short. Rank ``rank`` takes its slice of every global batch,
    so the ranks always train on the same bucket at the same step.
    """
    by_bucket: dict[int, list[int]] = {}
    for index, b in enumerate(bucket_ids):
        by_bucket.setdefault(int(b), []).append(index)
    width = batch_size * num_replicas
    batches = []
    for b in sorted(by_bucket):
        idx = by_bucket[b]
        if generator is not None:
            idx = [idx[i] for i in torch.randperm(len(idx), generator=generator).tolist()]
        if pad and len(idx) % width:
            short = width - len(idx) % width
            idx = idx + (idx * (short // len(idx) + 1))[:short]
        batches += [idx[i : i + width] for i in range(0, len(idx), width)]
    if generator is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return [batch[rank * batch_size : (rank + 1) * batch_size] for batch in batches]
