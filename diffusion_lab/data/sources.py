"""Data sets. Each item is a dict: ``pixel_values`` ``[C, H, W]`` in [-1, 1], and where known
``label`` (int) and ``caption`` (str). ``ImageFolderDataset`` also records ``original_size`` and
``crop_top_left`` (``[2]``) and can add paired images (``[C, H, W]`` in [-1, 1]) and a loss
``mask`` (``[1, H, W]`` in [0, 1]), all cut like the image (one ``Geometry`` draw)."""

from __future__ import annotations

import csv
import json
import logging
import warnings
from pathlib import Path
from typing import Collection, Literal, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from diffusion_lab.data.buckets import AspectBuckets
from diffusion_lab.data.transforms import ImageTransform
from diffusion_lab.utils.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
log = logging.getLogger(__name__)

MASK_SUFFIX = "-masklabel.png"  # OneTrainer's name for the loss mask beside an image: 0001.png -> 0001-masklabel.png
MASK_KEY = "mask"  # the batch key of loss masks: [1, H, W] in [0, 1]

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


def _auto_caption_column(rows: list[dict], columns: list[str], exclude: Collection[str] = ()) -> str | None:
    """The caption column when it is unambiguous: ``text`` (what diffusers' train_text_to_image.py
    reads), ``caption``, or else the only column besides ``file_name`` (and ``exclude``: the paired
    image columns) that holds strings."""
    named = [c for c in ("text", "caption") if c in columns]
    if len(named) == 1:
        return named[0]
    if named:
        return None  # both: the user must say which
    strings = [c for c in columns if c != "file_name" and c not in exclude and all(isinstance(r.get(c), str) for r in rows)]
    return strings[0] if len(strings) == 1 else None


def _metadata_rows(root: Path) -> tuple[Path, list[dict]] | None:
    """(path, rows) of diffusers' imagefolder ``metadata.jsonl`` (else ``metadata.csv``) under
    ``root``, or None when there is neither."""
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
        return path, rows
    return None


def _read_metadata(root: Path, caption_column: str, exclude: Collection[str] = ()) -> dict[str, str] | None:
    """Captions from diffusers' imagefolder ``metadata.jsonl``/``metadata.csv`` (``file_name`` +
    caption column), or None when there is no metadata file. ``caption_column="auto"`` picks the
    column with ``_auto_caption_column`` (and None when that is ambiguous, with a warning)."""
    found = _metadata_rows(root)
    if found is not None:
        path, rows = found
        columns = sorted({k for r in rows for k in r})
        if caption_column == "auto":
            picked = _auto_caption_column(rows, columns, exclude)
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
    ``on_bad_image``: ``fail`` (default, names the file) or ``skip``.

    Items: ``pixel_values`` ``[C, H, W]`` in [-1, 1], ``original_size`` and ``crop_top_left``
    (``[2]``, (h, w) / (top, left): SDXL's micro-conditioning), ``caption`` when there are captions,
    one entry per paired image and ``mask`` with masks.

    Args:
        paired_images: metadata column -> batch key, e.g. ``{"conditioning_image":
            "conditioning_pixel_values"}`` (ControlNet, the diffusers convention): the column holds a
            file name relative to ``root``; the file gets the main image's resize, crop and flip and
            is ``[C, H, W]`` in [-1, 1]. The batch key ``mask`` loads a loss mask instead. Files named
            in these columns are not training images themselves.
        masks: load the loss mask ``<stem>-masklabel.png`` beside each image (OneTrainer's name;
            white = train on these pixels): ``mask`` ``[1, H, W]`` in [0, 1], all ones for images
            without one. Mask files are never training images.
        buckets: aspect-ratio buckets (``data.buckets=true``): each image is resized and cropped to
            its nearest bucket (``bucket_ids``) instead of ``resolution`` square.
    """

    def __init__(
        self,
        root: str,
        transform: ImageTransform,
        caption_column: str | None = None,
        on_bad_image: Literal["fail", "skip"] = "fail",
        validate: bool = True,
        paired_images: Mapping[str, str] | None = None,
        masks: bool = False,
        buckets: AspectBuckets | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(
                f"data.root={str(root)!r} is not a directory. Point data.root at a folder of images "
                f"(searched recursively for {', '.join(IMAGE_EXTENSIONS)})."
            )
        self.paired_images = dict(paired_images or {})
        if masks and MASK_KEY in self.paired_images.values():
            raise ConfigError(
                f"data.masks=true and data.paired_images maps a column to {MASK_KEY!r}: two sources for one mask. "
                f"Use the {MASK_SUFFIX} files (data.masks=true) or the metadata column, not both."
            )
        rows = self._paired_rows() if self.paired_images else {}
        paired_files = {(self.root / str(r[c])).resolve() for r in rows.values() for c in self.paired_images if r.get(c)}
        files = sorted(
            p for p in self.root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.endswith(MASK_SUFFIX) and p.resolve() not in paired_files
        )
        if not files:
            raise DataError(
                f"data.root={str(self.root)!r} contains no images (looked recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)}). Check the path, or copy images into it."
            )
        self.transform = transform
        self.skipped: list[Path] = []
        self.sizes: dict[Path, tuple[int, int]] = {}  # PIL (w, h) of each image
        self.buckets = buckets
        if validate:
            files = self._check_images(files, on_bad_image)
        self.files = files
        self.captions: list[str] | None = None
        self.caption_note = "data.caption_column=null"
        if caption_column == "auto":
            self.captions = self._auto_captions()
        elif caption_column:
            self.captions = self._captions(caption_column)
        # per image: batch key -> paired file (the masks: None = no mask, all ones)
        self.paired: list[dict[str, Path | None]] = [self._paired_files(p, rows, validate) for p in self.files]
        if masks:
            self._add_mask_files()
        self.bucket_ids: list[int] | None = None
        if buckets is not None:
            self.bucket_ids = [buckets.nearest(*self._size(p)[::-1]) for p in self.files]
            log.info(f"aspect-ratio buckets under {self.root}: {buckets.describe(self.bucket_ids)}")

    @property
    def paired_keys(self) -> tuple[str, ...]:
        """Batch keys of the paired images and the loss mask (what a latent cache must carry along)."""
        return tuple(self.paired[0]) if self.paired else ()

    def _size(self, path: Path) -> tuple[int, int]:
        """PIL (w, h) of an image (read from its header when not validated)."""
        if path not in self.sizes:
            with Image.open(path) as im:
                self.sizes[path] = im.size
        return self.sizes[path]

    # ---- paired images and masks ---------------------------------------------------------------
    def _paired_rows(self) -> dict[str, dict]:
        """The metadata rows by ``file_name``; every ``paired_images`` column must be in them."""
        found = _metadata_rows(self.root)
        columns = list(self.paired_images)
        if found is None:
            raise DataError(
                f"data.paired_images={self.paired_images} reads the column(s) {columns} of {self.root}/metadata.jsonl "
                f"(or metadata.csv), but there is neither. Write one row per image with 'file_name' and "
                f"{', '.join(repr(c) for c in columns)} (a file name relative to data.root), as diffusers' ControlNet script expects."
            )
        path, rows = found
        have = sorted({k for r in rows for k in r})
        for column in columns:
            if column not in have or "file_name" not in have:
                missing = "file_name" if "file_name" not in have else column
                raise DataError(
                    f"{path} has no column {missing!r} (columns found: {have}), which data.paired_images={self.paired_images} "
                    f"needs; set data.paired_images to map one of {have} to a batch key, or add the column to the file."
                )
        return {str(r["file_name"]): r for r in rows if "file_name" in r}

    def _paired_files(self, image: Path, rows: dict[str, dict], validate: bool) -> dict[str, Path | None]:
        """Batch key -> the paired file of ``image``; a missing row, value or file (or an unreadable
        one, or a mask of another size) is a DataError naming the file and the column."""
        if not self.paired_images:
            return {}
        rel = image.relative_to(self.root).as_posix()
        row = rows.get(rel, rows.get(image.name))
        where = f"{self.root}/metadata.*"
        out: dict[str, Path | None] = {}
        for column, key in self.paired_images.items():
            value = (row or {}).get(column)
            if not value:
                raise DataError(
                    f"{image} has no {column!r} in {where} (data.paired_images maps {column!r} -> {key!r}): "
                    f"add a row with file_name={rel!r} and its {column!r} file, or remove the image."
                )
            path = self.root / str(value)
            self._check_paired(image, path, column, key, validate)
            out[key] = path
        return out

    def _check_paired(self, image: Path, path: Path, column: str, key: str, validate: bool) -> None:
        source = f"column {column!r} of {self.root}/metadata.*" if column else f"the mask beside {image.name} ({MASK_SUFFIX}, data.masks=true)"
        if not path.is_file():
            raise DataError(
                f"{path} does not exist: it is the {key!r} file of {image} ({source}). File names in paired-image "
                f"columns are relative to data.root={str(self.root)!r}; fix the name in the metadata or add the file."
            )
        try:
            with Image.open(path) as im:
                if validate:
                    im.load()
                size = im.size
        except Exception as e:  # PIL raises many types for truncated/garbage files
            raise DataError(
                f"cannot read {path} ({type(e).__name__}: {e}): it is the {key!r} file of {image} ({source}). "
                f"Replace it with a readable image."
            ) from e
        if key == MASK_KEY and size != self._size(image):
            (w, h), (iw, ih) = size, self._size(image)
            raise DataError(
                f"mask {path} is {w}x{h} but its image {image} is {iw}x{ih} ({source}); a loss mask must have its "
                f"image's size (white = train on these pixels). Resize the mask to {iw}x{ih}."
            )

    def _add_mask_files(self) -> None:
        found = 0
        for image, paired in zip(self.files, self.paired):
            path = image.with_name(image.stem + MASK_SUFFIX)
            if path.exists():
                self._check_paired(image, path, "", MASK_KEY, validate=True)
                found += 1
            paired[MASK_KEY] = path if path.exists() else None
        if not found:
            raise DataError(
                f"data.masks=true but no image under {self.root} has a mask beside it (looked for e.g. "
                f"{self.files[0].with_name(self.files[0].stem + MASK_SUFFIX)}). Name each mask <image stem>{MASK_SUFFIX} "
                f"(white = train), or set data.masks=false."
            )
        log.info(f"loss masks: {found} of {len(self.files)} image(s) under {self.root} have one; the others train on every pixel")

    # ---- captions -----------------------------------------------------------------------------
    def _auto_captions(self) -> list[str] | None:
        metadata = [self.root / n for n in ("metadata.jsonl", "metadata.csv") if (self.root / n).exists()]
        if metadata:
            meta = _read_metadata(self.root, "auto", exclude=self.paired_images)
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
                self.sizes[path] = size
            except Exception as e:  # PIL raises many types for truncated/garbage files
                if on_bad_image != "skip":
                    raise DataError(
                        f"cannot read image {path}: {type(e).__name__}: {e}. The file is truncated or not an "
                        f"image. Delete or replace it, or set data.on_bad_image=skip to skip unreadable files."
                    ) from e
                self.skipped.append(path)
                continue
            if self._upscaled(size):
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
                f"{len(small)} of {len(good)} image(s) under {self.root} are smaller than {'their bucket (data.buckets=true)' if self.buckets else f'data.resolution={r}'} and "
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

    def _upscaled(self, size: tuple[int, int]) -> bool:
        """Whether an image of PIL ``size`` (w, h) must be enlarged to cover its output (the
        ``resolution`` square, or its bucket)."""
        w, h = size
        th, tw = self.buckets.sizes[self.buckets.nearest(h, w)] if self.buckets is not None else (self.transform.resolution,) * 2
        return h < th or w < tw

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
        size = self.buckets.sizes[self.bucket_ids[i]] if self.bucket_ids is not None else None
        with Image.open(self.files[i]) as im:
            geometry = self.transform.draw(im.size, size=size)  # one draw for the image, its pairs and mask
            item = {
                "pixel_values": self.transform.apply(im, geometry),
                "original_size": torch.tensor(geometry.original_size),
                "crop_top_left": torch.tensor(geometry.crop_top_left),
            }
        for key, path in self.paired[i].items():
            if path is None:  # an image without a mask file: every pixel counts
                item[key] = torch.ones(1, *geometry.size)
                continue
            with Image.open(path) as im:
                item[key] = self.transform.apply_mask(im, geometry) if key == MASK_KEY else self.transform.apply(im, geometry)
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
