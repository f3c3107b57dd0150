"""A folder of images (``data=image_folder``): every image under ``root``, checked before training,
with captions from the folder's metadata (``data/metadata.py``: diffusers' imagefolder convention,
read by ``datasets``) or from a ``.txt`` beside each image (kohya), paired images named in the
metadata, and loss masks beside the images (OneTrainer)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Literal, Mapping

import torch
from PIL import Image
from torch.utils.data import Dataset

from diffusion_lab.data.buckets import AspectBuckets
from diffusion_lab.data.metadata import folder_metadata, txt_captions
from diffusion_lab.data.transforms import ImageTransform
from diffusion_lab.utils.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
log = logging.getLogger(__name__)

MASK_SUFFIX = "-masklabel.png"  # OneTrainer's name for the loss mask beside an image: 0001.png -> 0001-masklabel.png
MASK_KEY = "mask"  # the batch key of loss masks: [1, H, W] in [0, 1]


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursive), in sorted order. Captions, when ``caption_column`` is
    set, come from ``metadata.jsonl``/``metadata.csv`` (diffusers imagefolder) or else from a ``.txt``
    file beside each image (kohya). ``caption_column="auto"``: the metadata's unambiguous caption
    column (``text``, ``caption`` or its only string column), else ``.txt`` files when every image
    has one, else no captions (the reason is kept in ``caption_note`` for the model's check).
    ``on_bad_image``: ``fail`` (default, names the file) or ``skip``.

    Items: ``pixel_values`` ``[C, H, W]`` in [-1, 1], ``original_size`` and ``crop_top_left``
    (``[2]``, (h, w) / (top, left): SDXL's micro-conditioning), ``caption`` when there are captions,
    one entry per paired image and ``mask`` with masks, all cut like the image (one ``Geometry`` draw).

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
        self.transform, self.buckets = transform, buckets
        self.skipped: list[Path] = []
        self.sizes: dict[Path, tuple[int, int]] = {}  # PIL (w, h) of each image
        self.metadata = folder_metadata(self.root) if caption_column or self.paired_images else None
        files = self._image_files()
        self.files = self._check_images(files, on_bad_image) if validate else files
        self.captions: list[str] | None = None
        self.caption_note = "data.caption_column=null"
        if caption_column == "auto":
            self.captions = self._auto_captions()
        elif caption_column:
            self.captions = self._captions(caption_column)
        # per image: batch key -> paired file (the masks: None = no mask, all ones)
        self.paired: list[dict[str, Path | None]] = [self._paired_files(p, validate) for p in self.files]
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

    def _image_files(self) -> list[Path]:
        """The training images: every image file under ``root`` but the masks and paired files, sorted."""
        rows = self._paired_rows().values() if self.paired_images else ()
        paired = {(self.root / str(r[c])).resolve() for r in rows for c in self.paired_images if r.get(c)}
        files = sorted(
            p for p in self.root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.endswith(MASK_SUFFIX) and p.resolve() not in paired
        )
        if not files:
            raise DataError(
                f"data.root={str(self.root)!r} contains no images (looked recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)}). Check the path, or copy images into it."
            )
        return files

    # ---- the up-front check ----------------------------------------------------------------------
    def _check_images(self, files: list[Path], on_bad_image: str) -> list[Path]:
        """Decode every image once, before training: unreadable files fail (naming the file) or
        are skipped with a count; images smaller than the resolution are reported once."""
        good, small = [], []
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
            target = "their bucket (data.buckets=true)" if self.buckets else f"data.resolution={self.transform.resolution}"
            warnings.warn(
                f"{len(small)} of {len(good)} image(s) under {self.root} are smaller than {target} and will be upscaled "
                f"(smallest: {path}, {w}x{h}); quality may suffer. Use a smaller data.resolution or larger images.",
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

    # ---- paired images and masks -----------------------------------------------------------------
    def _paired_rows(self) -> dict[str, dict]:
        """The metadata rows by ``file_name``; every ``paired_images`` column must be in them."""
        columns = list(self.paired_images)
        if self.metadata is None:
            raise DataError(
                f"data.paired_images={self.paired_images} reads the column(s) {columns} of {self.root}/metadata.jsonl "
                f"(or metadata.csv), but there is neither. Write one row per image with 'file_name' and "
                f"{', '.join(repr(c) for c in columns)} (a file name relative to data.root), as diffusers' ControlNet script expects."
            )
        have = self.metadata.columns
        for column in columns:
            if column not in have or "file_name" not in have:
                missing = "file_name" if "file_name" not in have else column
                raise DataError(
                    f"{self.metadata.path} has no column {missing!r} (columns found: {have}), which data.paired_images={self.paired_images} "
                    f"needs; set data.paired_images to map one of {have} to a batch key, or add the column to the file."
                )
        return self.metadata.rows

    def _paired_files(self, image: Path, validate: bool) -> dict[str, Path | None]:
        """Batch key -> the paired file of ``image``; a missing row, value or file (or an unreadable
        one, or a mask of another size) is a DataError naming the file and the column."""
        if not self.paired_images:
            return {}
        row = self.metadata.row(image, self.root) or {}
        out: dict[str, Path | None] = {}
        for column, key in self.paired_images.items():
            if not row.get(column):
                raise DataError(
                    f"{image} has no {column!r} in {self.root}/metadata.* (data.paired_images maps {column!r} -> {key!r}): "
                    f"add a row with file_name={image.relative_to(self.root).as_posix()!r} and its {column!r} file, or remove the image."
                )
            out[key] = self.root / str(row[column])
            self._check_paired(image, out[key], column, key, validate)
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

    # ---- captions --------------------------------------------------------------------------------
    def _auto_captions(self) -> list[str] | None:
        meta = self.metadata
        if meta is not None:
            column = meta.caption_column(exclude=self.paired_images)
            if column is None:
                warnings.warn(
                    f"{meta.path}: no unambiguous caption column (columns: {meta.columns}); training without captions. "
                    f"Set data.caption_column to the column that holds the captions.",
                    stacklevel=2,
                )
                self.caption_note = f"no unambiguous caption column in {meta.path} (columns: {meta.columns})"
                return None
            log.info(f"captions: column {column!r} of {meta.path} (data.caption_column=auto; set it to choose another)")
            return self._captions(column)
        if all(p.with_suffix(".txt").exists() for p in self.files):
            log.info(f"captions: the .txt file beside each image under {self.root} (data.caption_column=auto)")
            return txt_captions(self.files, self.root, "auto")
        self.caption_note = f"no metadata.jsonl/metadata.csv and no .txt beside every image under {self.root}"
        return None

    def _captions(self, caption_column: str) -> list[str]:
        """From the metadata's ``caption_column``, or the ``.txt`` beside each image when there is no metadata file."""
        if self.metadata is None:
            return txt_captions(self.files, self.root, caption_column)
        return self.metadata.captions(self.files, self.root, caption_column)

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
