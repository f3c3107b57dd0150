"""Writing a shard set (``python -m diffusion_lab.prepare``): ``litdata.optimize`` worker processes
run ``ShardWriter`` over the source's items; a split (or bucket) at a time, the manifest last."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from diffusion_lab.compat.litdata import import_litdata
from diffusion_lab.data.caching import cache_latents, cacheable_text_fn
from diffusion_lab.data.datamodule import bucket_ids_of
from diffusion_lab.data.shards.manifest import FORMAT_VERSION, MANIFEST, Kind, count_items, forget_peeked, model_identity
from diffusion_lab.data.shards.reading import encode_png
from diffusion_lab.data.shards.store import LocalRoot, S3Root, ShardRoot, shard_root
from diffusion_lab.utils.errors import ConfigError, DataError
from diffusion_lab.utils.quiet import without_printed_noise


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
    (an exception inside a litdata worker would hang the job). With ``module``, the images (and
    captions) are encoded by ``data/caching.cache_latents``, what ``model.cache=true`` runs."""

    def __init__(
        self, dataset: Dataset, log_dir: str, on_bad_image: Literal["fail", "skip"], module: torch.nn.Module | None = None,
        text_states: bool = True, device: str = "cpu", store_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.dataset, self.log_dir, self.on_bad_image = dataset, Path(log_dir), on_bad_image
        self.module, self.text_states, self.device, self.store_dtype = module, text_states, device, store_dtype

    def _log(self, kind: str, line: str) -> None:
        with open(self.log_dir / f"{kind}-{os.getpid()}.txt", "a") as f:
            f.write(line.replace("\n", " ") + "\n")

    def _read(self, indices: list[int]) -> list[tuple[int, dict]] | None:
        """``(index, item)`` of each readable item; None when one failed and the job must stop."""
        items = []
        for i in indices:
            try:
                items.append((i, self.dataset[i]))
            except Exception as e:  # PIL raises many types for truncated/garbage files
                self._log("skipped" if self.on_bad_image == "skip" else "failed", f"{item_name(self.dataset, i)}\t{type(e).__name__}: {e}")
                if self.on_bad_image != "skip":
                    return None
        return items

    def __call__(self, indices: list[int]):
        if any(self.log_dir.glob("failed-*.txt")):
            return  # another worker found a bad image: stop early, the job fails
        items = self._read(indices)
        if not items:
            return
        encoded = self._encode([item for _, item in items]) if self.module is not None else None
        for k, (i, item) in enumerate(items):
            sample: dict = {"index": int(i)}
            for key, value in item.items():
                if key != "pixel_values":
                    sample[key] = _plain(value)
                elif encoded is None:
                    sample["image"] = encode_png(value)
            yield sample | (encoded[k] if encoded is not None else {})

    def _encode(self, items: list[dict]) -> list[dict[str, torch.Tensor]]:
        """The VAE posterior ``latent_moments`` of each image (and, with ``text_states``, the frozen
        text states of each caption), stored as ``store_dtype``: what the module reads from a batch."""
        module = self.module.to(self.device)
        text_fn = cacheable_text_fn(module) if self.text_states else None
        inputs = [{k: item[k] for k in ("pixel_values", "caption") if k in item} for item in items]
        cached = cache_latents(inputs, module.codec.moments, text_fn, self.device, batch_size=len(items), progress=False)
        return [{k: v.to(self.store_dtype) for k, v in cached[i].items() if k != "caption"} for i in range(len(items))]


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


def _checked_encoder(module: torch.nn.Module | None, text_states: bool, store_dtype: str) -> bool:
    """Whether text states are stored; a ``ConfigError`` for a module without a VAE or a dtype
    litdata cannot store. Puts ``module`` in eval mode."""
    from diffusion_lab.components.vae import IdentityCodec

    if store_dtype not in ("float32", "float16"):  # litdata cannot store bfloat16
        raise ConfigError(f"prepare.store_dtype={store_dtype!r}: use float32 or float16 (half the disk for encoded latents and text states).")
    if module is None:
        return False
    if isinstance(getattr(module, "codec", None), IdentityCodec) or not hasattr(module, "codec"):
        raise ConfigError("prepare.encode=true stores VAE latents: it needs a latent model (model=latent_sd / latent_sdxl with a vae=), not a pixel model; or set prepare.encode=false.")
    module.eval()
    return text_states and cacheable_text_fn(module) is not None


def _write_part(writer: ShardWriter, inputs: list[int], tmp: Path, rel: str, target: ShardRoot, kind: Kind, num_workers: int, options: dict) -> int:
    """``inputs`` (indices of the writer's data set) as the litdata folder ``tmp/rel`` (``options``:
    litdata's batch and chunk sizes), uploaded (and deleted here) when ``target`` is an object
    store. Returns how many items it holds."""
    dest = tmp / rel
    workers = max(1, min(num_workers, -(-len(inputs) // options["batch_size"])))
    print(f"writing {len(inputs)} items to {target.url}/{rel} ({kind}, {workers} worker processes)", flush=True)
    with without_printed_noise():  # litdata's account banner (utils/quiet.py)
        import_litdata().optimize(
            writer, inputs, str(dest), num_workers=workers, **options,
            keep_data_ordered=True, reorder_files=False, start_method="fork", verbose=True,
        )
    failed = sorted(writer.log_dir.glob("failed-*.txt"))
    if failed:
        name, why = failed[0].read_text().splitlines()[0].split("\t", 1)
        raise DataError(
            f"cannot read image {name}: {why}. The file is truncated or not an image. Delete or replace it, or set "
            f"prepare.on_bad_image=skip (data.on_bad_image=skip) to skip unreadable files; nothing was written to {target.url}."
        )
    if not (dest / "index.json").is_file():  # every item of a group can have been skipped
        return 0
    n = count_items(LocalRoot(tmp), rel)
    if isinstance(target, S3Root):  # staged one part at a time: the local disk holds one split (or bucket)
        print(f"uploading {target.url}/{rel}", flush=True)
        target.upload(dest, rel)
        shutil.rmtree(dest)
    return n


def _finish(manifest: dict, skipped_by_source: list, log_dir: Path, target: ShardRoot) -> None:
    """List the skipped items in ``manifest`` and write it beside the shards (last: it marks the
    set complete); upload it to an object store."""
    skipped = [line.split("\t")[0] for f in sorted(log_dir.glob("skipped-*.txt")) for line in f.read_text().splitlines()]
    manifest["skipped"] = [str(p) for p in skipped_by_source] + skipped
    if manifest["skipped"]:
        warnings.warn(f"skipped {len(manifest['skipped'])} unreadable image(s) (first: {manifest['skipped'][0]}); listed in {target.url}/{MANIFEST}", stacklevel=3)
    shutil.rmtree(log_dir)
    (log_dir.parent / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    if isinstance(target, S3Root):
        target.upload(log_dir.parent / MANIFEST, MANIFEST)
        forget_peeked(target.url)


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
    staging_dir: str | None = None,
) -> dict:
    """Write ``splits`` (``{"train": ds, "val": ds | None}``, datasets of the usual item dicts) as
    a shard set at ``out_dir``, built in a temp folder beside it and renamed into place once
    complete with its manifest (a killed job leaves no shard set that looks whole). An
    ``s3://bucket/prefix`` ``out_dir`` is staged in ``staging_dir`` one split (or bucket) at a time,
    each uploaded once complete, the manifest last. With ``module`` (a latent model), stores VAE
    posteriors and, with ``text_states``, frozen text states instead of pixels. Items with aspect
    buckets (``bucket_ids``; ``bucket_sizes`` their ``(h, w)``) are written one folder per bucket,
    ``<split>/<h>x<w>/``. ``store_dtype=float16`` halves the disk of encoded latents and text
    states. ``source["_skipped"]``: files the source skipped itself. Returns the manifest."""
    from diffusion_lab.utils.io import atomic_dir

    target = check_out_dir(out_dir, overwrite)
    text_states = _checked_encoder(module, text_states, store_dtype)
    kind: Kind = "pixels" if module is None else "latents"
    skipped_by_source = source.pop("_skipped", [])
    manifest: dict = {"format_version": FORMAT_VERSION, "kind": kind, "resolution": resolution, "channels": channels, "source": source, "num_items": {}, "skipped": []}
    if module is not None:
        manifest["model"] = model_identity(module, text_states) | (model_config or {})
        manifest["store_dtype"] = store_dtype
    parts = {split: _parts(ds, bucket_sizes) for split, ds in splits.items() if ds is not None and len(ds)}
    if used := sorted({size for groups in parts.values() for size, _ in groups if size}):
        manifest["buckets"] = [list(size) for size in used]
    options = {"batch_size": batch_size, **({"chunk_size": chunk_size} if chunk_size else {"chunk_bytes": chunk_bytes})}
    with (_uploaded(target, staging_dir) if isinstance(target, S3Root) else atomic_dir(target.path)) as tmp:
        log_dir = Path(tmp) / "log"
        log_dir.mkdir()
        for split, groups in parts.items():
            writer = ShardWriter(splits[split], str(log_dir), on_bad_image, module, text_states, device, getattr(torch, store_dtype))
            manifest["num_items"][split] = sum(
                _write_part(writer, inputs, Path(tmp), f"{split}/{size[0]}x{size[1]}" if size else split, target, kind, num_workers, options)
                for size, inputs in groups
            )
        _finish(manifest, skipped_by_source, log_dir, target)
    return manifest


def check_out_dir(out_dir: str | Path, overwrite: bool) -> ShardRoot:
    """Where prepare writes (``out_dir``: a folder or ``s3://bucket/prefix``); a ``ConfigError``
    before any work when it is taken and ``overwrite`` is off, or the store cannot be reached."""
    target = shard_root(out_dir, key="out_dir")
    if isinstance(target, LocalRoot):
        if target.path.exists() and not overwrite:
            raise ConfigError(f"out_dir={target.path} exists; pick another folder or set prepare.overwrite=true to replace it (the old one stays until the new one is complete).")
        return target
    if target.is_file(MANIFEST) and not overwrite:
        raise ConfigError(f"out_dir={target.url} holds a shard set; pick another prefix or set prepare.overwrite=true to replace it (on an object store the old set is deleted first).")
    if not overwrite and target.has_objects():
        raise ConfigError(
            f"out_dir={target.url} holds objects but no {MANIFEST} (an interrupted prepare, or other data); pick another prefix, "
            f"or set prepare.overwrite=true to delete everything under it and write the shard set."
        )
    return target


@contextmanager
def _uploaded(target: S3Root, staging_dir: str | None):
    """A local staging folder (in ``staging_dir``, default the system's temp folder) for writing
    to ``target``; the caller uploads each finished part. The old objects under the prefix go
    first; a failed prepare deletes what it uploaded (a killed one leaves objects without
    ``shards.json``, which ``read_manifest`` refuses)."""
    if staging_dir:
        Path(staging_dir).expanduser().mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="diffusion_lab-prepare-", dir=Path(staging_dir).expanduser() if staging_dir else None)
    try:
        target.delete_all(first=MANIFEST)
        yield tmp
    except BaseException:
        try:
            target.delete_all(first=MANIFEST)
        except Exception as cleanup:  # the first error is the one to report
            warnings.warn(f"could not delete the partial upload under {target.url}: {cleanup}", stacklevel=3)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
