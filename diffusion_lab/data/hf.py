"""Hugging Face data sets (``data=hf``), loaded with errors a person can act on; and the one
way a local file is read through a ``datasets`` builder (``load_file``: the image folder's metadata)."""

from __future__ import annotations

import glob
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from diffusion_lab.data.transforms import ImageTransform
from diffusion_lab.utils.errors import DataError

_BUILDER_BY_SUFFIX = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def _expand(data_files: str | Sequence[str]) -> list[Path]:
    patterns = [data_files] if isinstance(data_files, str) else list(data_files)
    out: list[Path] = []
    for pattern in patterns:
        p = Path(pattern).expanduser()
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file())
        else:
            out += [Path(q) for q in sorted(glob.glob(str(p), recursive=True))]
    return out


def _is_parquet(path: Path) -> tuple[bool, bytes, int]:
    """(starts and ends with the magic bytes ``PAR1``, first 4 bytes, size)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - 4))
        tail = fh.read(4)
    return head == b"PAR1" and tail == b"PAR1", head, size


def check_parquet_files(files: list[Path]) -> None:
    """Parquet files start and end with the magic bytes ``PAR1``. A failed download often saves
    an HTML error page under a ``.parquet`` name; catch that before ``datasets`` gives a cryptic
    ArrowInvalid."""
    for f in files:
        if f.suffix != ".parquet":
            continue
        ok, head, size = _is_parquet(f)
        if not ok:
            sniff = head.decode("latin-1")
            hint = " It looks like an HTML/text page (a failed or rate-limited download)." if sniff.strip().startswith("<") or sniff.isprintable() else ""
            raise DataError(
                f"{f} is not a parquet file (it does not start and end with 'PAR1'; {size} bytes).{hint} "
                f"Delete this cached copy (and the data set's folder in the Hugging Face cache, "
                f"~/.cache/huggingface/datasets and hub) and download it again, or point data.data_files at good files."
            )


def load_hf_dataset(name: str | None, data_files, builder: str | None, split: str, cache_dir: str | None = None):
    import datasets

    if not name and not data_files:
        raise DataError("data=hf needs data.name (a hub data set, e.g. nelorth/oxford-flowers) or data.data_files (local parquet/arrow files or an image folder).")
    if data_files:
        files = _expand(data_files)
        if not files:
            raise DataError(f"data.data_files={data_files!r} matches no files. Check the path or glob.")
        check_parquet_files(files)
        if builder is None:
            suffixes = {f.suffix for f in files}
            builder = _BUILDER_BY_SUFFIX.get(suffixes.pop()) if len(suffixes) == 1 else "imagefolder"
            builder = builder or "imagefolder"
        kwargs = {"data_dir": str(data_files)} if builder == "imagefolder" and Path(str(data_files)).is_dir() else {"data_files": [str(f) for f in files]}
        try:
            return datasets.load_dataset(builder, split=split, cache_dir=cache_dir, **kwargs)
        except Exception as e:
            raise DataError(f"could not load data.data_files={data_files!r} with builder {builder!r}: {type(e).__name__}: {e}") from e
    try:
        return datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except Exception as e:
        text = f"{type(e).__name__}: {e}"
        cached = _cached_parquet_files(name, cache_dir)
        if cached:
            check_parquet_files(cached)  # names the broken cached file, if one is
        if "parquet" in text.lower() or "ArrowInvalid" in text:
            raise DataError(
                f"loading data set {name!r} failed while reading its parquet files ({text}). A cached file is "
                f"probably corrupt (an HTML error page saved by a failed download). Delete the data set from the "
                f"Hugging Face cache (~/.cache/huggingface/hub/datasets--{name.replace('/', '--')} and "
                f"~/.cache/huggingface/datasets) and download again."
            ) from e
        raise DataError(
            f"could not load data set {name!r} ({text}). Without network access, download it elsewhere and point "
            f"data.data_files at the local parquet/arrow files (or use data=image_folder data.root=DIR)."
        ) from e


def _cached_parquet_files(name: str, cache_dir: str | None) -> list[Path]:
    """The ``.parquet`` files of hub data set ``name`` in the Hugging Face hub cache (or
    ``cache_dir``): the snapshot links, which name the files as the user knows them."""
    from huggingface_hub import constants

    roots = [Path(cache_dir).expanduser()] if cache_dir else []
    roots.append(Path(constants.HF_HUB_CACHE))
    repo = f"datasets--{name.replace('/', '--')}"
    return [f for root in roots for f in sorted((root / repo / "snapshots").glob("*/**/*.parquet")) if f.is_file()]


def load_file(builder: str, path: Path):
    """``datasets.load_dataset(builder)`` of one local file (``imagefolder`` for an image folder's
    metadata.jsonl / metadata.csv, ``json``, ``csv``), the ``train`` split, in memory. Nothing is
    downloaded, and the Arrow copy ``datasets`` writes goes to a temporary folder instead of
    ~/.cache/huggingface: an edited file is always read afresh. Errors are the builder's own."""
    import datasets

    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # no "Generating train split" bar for a folder's metadata
    try:
        with tempfile.TemporaryDirectory(prefix="diffusion_lab-datasets-") as cache:
            return datasets.load_dataset(builder, data_files={"train": [str(path)]}, split="train", cache_dir=cache, keep_in_memory=True)
    finally:
        if not quiet:
            datasets.enable_progress_bars()


class HFImageDataset(Dataset):
    """A Hugging Face data set by hub name (``nelorth/oxford-flowers``) or local files
    (``data_files`` with ``builder`` = parquet / arrow / imagefolder)."""

    def __init__(
        self,
        transform: ImageTransform,
        name: str | None = None,
        data_files: str | Sequence[str] | None = None,
        builder: str | None = None,
        split: str = "train",
        image_column: str = "image",
        caption_column: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        self.ds = load_hf_dataset(name=name, data_files=data_files, builder=builder, split=split, cache_dir=cache_dir)
        columns = list(self.ds.column_names)
        for key, col in (("data.image_column", image_column), ("data.caption_column", caption_column)):
            if col is not None and col not in columns:
                raise DataError(f"{key}={col!r} is not a column of the data set {name or data_files} (columns: {columns}); set {key} to one of them.")
        self.transform = transform
        self.image_column = image_column
        self.caption_column = caption_column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        row = self.ds[i]
        image = row[self.image_column]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        item = {"pixel_values": self.transform(image)}
        if self.caption_column:
            item["caption"] = str(row[self.caption_column])
        return item
