"""Data sets. Each item is a dict: ``pixel_values`` ``[C, H, W]`` in [-1, 1], and where known
``label`` (int) and ``caption`` (str)."""

from __future__ import annotations

import csv
import json
import logging
import warnings
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from diffusion_lab.data.transforms import ImageTransform
from diffusion_lab.utils.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
log = logging.getLogger(__name__)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class DigitsDataset(Dataset):
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 16 grey levels), resized to
    the transform's resolution. Real data that needs no download. Captions follow
    ``caption_template`` (``{name}`` = "seven", ``{digit}`` = 7). ``thicken`` draws every stroke
    one pixel bolder (a 2x2 grey dilation of the 8x8 image), ``invert`` swaps ink and paper:
    concepts for LoRA experiments."""

    def __init__(self, transform: ImageTransform, caption_template: str = "a handwritten digit {name}", invert: bool = False, thicken: bool = False) -> None:
        from scipy.ndimage import grey_dilation
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
        if thicken:
            images = np.stack([grey_dilation(im, size=(2, 2)) for im in images])
        if invert:
            images = 255 - images
        self.images = images
        self.labels = digits.target.astype(np.int64)
        self.transform = transform
        self.caption_template = caption_template

    def __len__(self) -> int:
        return len(self.labels)

    def caption(self, label: int) -> str:
        return self.caption_template.format(name=DIGIT_NAMES[label], digit=label)

    def __getitem__(self, i: int) -> dict:
        label = int(self.labels[i])
        return {
            "pixel_values": self.transform(Image.fromarray(self.images[i], "L")),
            "label": label,
            "caption": self.caption(label),
        }


def _columns(path: Path) -> list[str] | str:
    """Column names of a .jsonl/.json/.csv file (for error messages), or why they are unknown."""
    try:
        if path.suffix == ".csv":
            with open(path, newline="") as f:
                return next(csv.reader(f), [])
        text = path.read_text()
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
        rows = rows if isinstance(rows, list) else [rows]
        return sorted({k for r in rows if isinstance(r, dict) for k in r})
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"unreadable: {type(e).__name__}"


def _auto_caption_column(rows: list[dict], columns: list[str]) -> str | None:
    """The caption column when it is unambiguous: ``text`` (what diffusers' train_text_to_image.py
    reads), ``caption``, or else the only column besides ``file_name`` that holds strings."""
    named = [c for c in ("text", "caption") if c in columns]
    if len(named) == 1:
        return named[0]
    if named:
        return None  # both: the user must say which
    strings = [c for c in columns if c != "file_name" and all(isinstance(r.get(c), str) for r in rows)]
    return strings[0] if len(strings) == 1 else None


def _read_metadata(root: Path, caption_column: str) -> dict[str, str] | None:
    """Captions from diffusers' imagefolder ``metadata.jsonl``/``metadata.csv`` (``file_name`` +
    caption column), or None when there is no metadata file. ``caption_column="auto"`` picks the
    column with ``_auto_caption_column`` (and None when that is ambiguous, with a warning)."""
    for name in ("metadata.jsonl", "metadata.csv"):
        path = root / name
        if not path.exists():
            continue
        if name.endswith(".jsonl"):
            rows = []
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise DataError(f"{path} line {n} is not JSON ({e}); metadata.jsonl needs one JSON object per line, e.g. {{\"file_name\": \"0001.png\", \"text\": \"a caption\"}}.") from e
        else:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        columns = sorted({k for r in rows for k in r})
        if caption_column == "auto":
            picked = _auto_caption_column(rows, columns)
            if picked is None or "file_name" not in columns:
                warnings.warn(
                    f"{path}: no unambiguous caption column (columns: {columns}); training without captions. "
                    f"Set data.caption_column to the column that holds the captions.",
                    stacklevel=2,
                )
                return None
            log.info(f"captions: column {picked!r} of {path} (data.caption_column=auto; set it to choose another)")
            caption_column = picked
        if "file_name" not in columns or caption_column not in columns:
            missing = "file_name" if "file_name" not in columns else caption_column
            raise DataError(
                f"{path} has no column {missing!r} (columns found: {columns}). The imagefolder convention "
                f"needs 'file_name' plus the caption column; set data.caption_column to one of {columns} "
                f"or rename the column in the file."
            )
        return {str(r["file_name"]): str(r[caption_column]) for r in rows}
    return None


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursive). Captions, when ``caption_column`` is set, come
    from ``metadata.jsonl``/``metadata.csv`` (diffusers imagefolder) or else from a ``.txt`` file
    beside each image (kohya). ``caption_column="auto"``: the metadata's unambiguous caption column
    (``text``, ``caption`` or its only string column), else ``.txt`` files when every image has
    one, else no captions (the reason is kept in ``caption_note`` for the model's check).
    ``on_bad_image``: ``fail`` (default, names the file) or ``skip``."""

    def __init__(
        self,
        root: str,
        transform: ImageTransform,
        caption_column: str | None = None,
        on_bad_image: Literal["fail", "skip"] = "fail",
        validate: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(
                f"data.root={str(root)!r} is not a directory. Point data.root at a folder of images "
                f"(searched recursively for {', '.join(IMAGE_EXTENSIONS)})."
            )
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise DataError(
                f"data.root={str(self.root)!r} contains no images (looked recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)}). Check the path, or copy images into it."
            )
        self.transform = transform
        self.skipped: list[Path] = []
        if validate:
            files = self._check_images(files, on_bad_image)
        self.files = files
        self.captions: list[str] | None = None
        self.caption_note = "data.caption_column=null"
        if caption_column == "auto":
            self.captions = self._auto_captions()
        elif caption_column:
            self.captions = self._captions(caption_column)

    def _auto_captions(self) -> list[str] | None:
        metadata = [self.root / n for n in ("metadata.jsonl", "metadata.csv") if (self.root / n).exists()]
        if metadata:
            meta = _read_metadata(self.root, "auto")
            if meta is not None:
                return self._captions_from(meta, "auto")
            self.caption_note = f"no unambiguous caption column in {metadata[0]} (columns: {_columns(metadata[0])})"
            return None
        if all(p.with_suffix(".txt").exists() for p in self.files):
            log.info(f"captions: the .txt file beside each image under {self.root} (data.caption_column=auto)")
            return self._captions_from(None, "auto")
        self.caption_note = f"no metadata.jsonl/metadata.csv and no .txt beside every image under {self.root}"
        return None

    def _check_images(self, files: list[Path], on_bad_image: str) -> list[Path]:
        """Decode every image once, before training: unreadable files fail (naming the file) or
        are skipped with a count; images smaller than the resolution are reported once."""
        good, small = [], []
        r = self.transform.resolution
        for path in files:
            try:
                with Image.open(path) as im:
                    im.load()
                    size = im.size
                good.append(path)
            except Exception as e:  # PIL raises many types for truncated/garbage files
                if on_bad_image != "skip":
                    raise DataError(
                        f"cannot read image {path}: {type(e).__name__}: {e}. The file is truncated or not an "
                        f"image. Delete or replace it, or set data.on_bad_image=skip to skip unreadable files."
                    ) from e
                self.skipped.append(path)
                continue
            if min(size) < r:
                small.append((path, size))
        if self.skipped:
            warnings.warn(
                f"skipped {len(self.skipped)} unreadable image(s) of {len(files)} under {self.root} "
                f"(data.on_bad_image=skip; first: {self.skipped[0]})",
                stacklevel=2,
            )
        if small:
            path, (w, h) = min(small, key=lambda ps: min(ps[1]))
            warnings.warn(
                f"{len(small)} of {len(good)} image(s) under {self.root} are smaller than data.resolution={r} and "
                f"will be upscaled (smallest: {path}, {w}x{h}); quality may suffer. Use a smaller data.resolution "
                f"or larger images.",
                stacklevel=2,
            )
            self.transform.warn_upscale = False  # said once, here, not again per item
        if not good:
            raise DataError(
                f"no readable images under data.root={str(self.root)!r} ({len(self.skipped)} unreadable, e.g. "
                f"{self.skipped[0]}). Replace the files or point data.root at another folder."
            )
        return good

    def _captions(self, caption_column: str) -> list[str]:
        return self._captions_from(_read_metadata(self.root, caption_column), caption_column)

    def _captions_from(self, meta: dict[str, str] | None, caption_column: str) -> list[str]:
        captions = []
        for path in self.files:
            rel = path.relative_to(self.root).as_posix()
            if meta is not None:
                if rel not in meta and path.name not in meta:
                    raise DataError(f"{rel} has no row in {self.root}/metadata.* (file_name column); add one or remove the image.")
                captions.append(meta.get(rel, meta.get(path.name)))
                continue
            txt = path.with_suffix(".txt")
            if not txt.exists():
                found = [f"{p.name} (columns: {_columns(p)})" for p in sorted(self.root.iterdir()) if p.suffix in (".jsonl", ".csv", ".json")]
                raise DataError(
                    f"no caption for {path}: looked for {self.root}/metadata.jsonl, {self.root}/metadata.csv "
                    f"(diffusers imagefolder) and {txt.name} beside the image (kohya). Found metadata-like files: "
                    f"{'; '.join(found) or 'none'}. Rename your metadata file to metadata.jsonl/metadata.csv (with "
                    f"'file_name' and data.caption_column={caption_column!r} columns), add .txt captions, or set "
                    f"data.caption_column=null to train without captions."
                )
            captions.append(txt.read_text().strip())
        return captions

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        with Image.open(self.files[i]) as im:
            item = {"pixel_values": self.transform(im)}
        if self.captions is not None:
            item["caption"] = self.captions[i]
        return item


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
        from diffusion_lab.data.hf import load_hf_dataset

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
