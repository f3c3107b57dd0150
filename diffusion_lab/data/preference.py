"""Preference pairs (``data=preference`` / ``data=preference_hf``) for ``method=dpo``: two images per
prompt and which one people (or a scorer) preferred, in Pick-a-Pic's columns:

    jpg_0, jpg_1   the two images (a file name relative to the folder; in a parquet / HF data set the
                   encoded image bytes, a ``{"bytes": ...}`` dict or a PIL image)
    label_0        1 = jpg_0 preferred, 0 = jpg_1 preferred, 0.5 = a tie (dropped, as the paper's code does)
    caption        the prompt

Items are ``pixel_values`` (the preferred image, what ``encode`` reads) and ``loser_pixel_values`` (the
rejected one), ``[C, H, W]`` in [-1, 1], given one resize / crop / flip draw as the image folder gives
paired images (``ImageTransform.draw``), plus ``caption``. ``paired_keys`` names the loser so a latent
cache (``model.cache``) carries it along.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Sequence

from PIL import Image
from torch.utils.data import Dataset

from diffusion_lab.data.metadata import metadata_rows
from diffusion_lab.data.transforms import ImageTransform
from diffusion_lab.utils.errors import DataError

log = logging.getLogger(__name__)

LOSER_KEY = "loser_pixel_values"  # the batch key of the rejected image of each pair
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
LABEL_COLUMN = "label_0"
LABELS = (0.0, 0.5, 1.0)


def check_label(value: Any, where: str) -> float:
    """``label_0`` as a float in {0, 0.5, 1}; anything else is a DataError naming ``where``."""
    try:
        label = float(value)
    except (TypeError, ValueError):
        label = None
    if label not in LABELS:
        raise DataError(
            f"{where}: {LABEL_COLUMN}={value!r}; it must be 1 (jpg_0 preferred), 0 (jpg_1 preferred) or 0.5 (a tie, "
            f"skipped), as in Pick-a-Pic."
        )
    return label


class PreferencePairs(Dataset):
    """Base: ``pairs`` holds (winner, loser, caption) per kept row; subclasses open an image."""

    def __init__(self, transform: ImageTransform) -> None:
        self.transform = transform
        self.pairs: list[tuple[Any, Any, str | None]] = []
        self.ties = 0

    @property
    def paired_keys(self) -> tuple[str, ...]:
        return (LOSER_KEY,)

    def _open_pair(self, winner: Any, loser: Any) -> tuple[Image.Image, Image.Image]:
        raise NotImplementedError

    def _keep(self, image_0: Any, image_1: Any, label: float, caption: str | None) -> None:
        if label == 0.5:
            self.ties += 1
            return
        self.pairs.append((image_0, image_1, caption) if label == 1.0 else (image_1, image_0, caption))

    def _check_not_empty(self, where: str) -> None:
        if self.ties:
            log.info(f"preference pairs: skipped {self.ties} tie(s) (label_0=0.5) of {len(self.pairs) + self.ties} in {where}")
        if not self.pairs:
            raise DataError(f"{where} holds no preference pair with a winner ({self.ties} tie(s), label_0=0.5); add pairs with label_0 0 or 1.")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        winner, loser, caption = self.pairs[i]
        w, l = self._open_pair(winner, loser)
        geometry = self.transform.draw(w.size)  # one draw: both images get the same resize, crop and flip
        item = {"pixel_values": self.transform.apply(w, geometry), LOSER_KEY: self.transform.apply(l, geometry)}
        if caption is not None:
            item["caption"] = caption
        return item


class PreferenceFolder(PreferencePairs):
    """A folder with ``metadata.jsonl`` (or ``metadata.csv``): one row per pair, ``{"jpg_0": "a.png",
    "jpg_1": "b.png", "label_0": 1, "caption": "..."}``, image names relative to ``root``. A missing
    column, file or unreadable image, or a label outside {0, 0.5, 1}, is a DataError naming the
    metadata file and its line.

    Args:
        root: the folder. transform: the images' transform (both images of a pair: one draw).
        caption_column: the prompt column (null: no captions, e.g. an unconditional pixel model).
    """

    def __init__(self, root: str, transform: ImageTransform, caption_column: str | None = "caption") -> None:
        super().__init__(transform)
        self.root = Path(root).expanduser()
        found = metadata_rows(self.root) if self.root.is_dir() else None
        if found is None:
            raise DataError(
                f"data.root={str(root)!r} has no metadata.jsonl (or metadata.csv): a preference folder needs one row per pair, "
                f'e.g. {{"jpg_0": "a.png", "jpg_1": "b.png", "label_0": 1, "caption": "a prompt"}} (label_0: 1 = jpg_0 preferred).'
            )
        path, rows = found
        needed = [*IMAGE_COLUMNS, LABEL_COLUMN, *([caption_column] if caption_column else [])]
        for n, row in enumerate(rows, 1):
            where = f"{path} line {n}"
            missing = [c for c in needed if c not in row or row[c] in (None, "")]
            if missing:
                hint = " (or set data.caption_column=null to train without prompts)" if caption_column in missing else ""
                raise DataError(f"{where} has no {', '.join(repr(c) for c in missing)} (columns: {sorted(row)}); every pair needs {needed}{hint}.")
            label = check_label(row[LABEL_COLUMN], where)
            files = [self._check_file(self.root / str(row[c]), c, where) for c in IMAGE_COLUMNS]
            self._keep(*files, label, str(row[caption_column]) if caption_column else None)
        self._check_not_empty(str(path))

    @staticmethod
    def _check_file(file: Path, column: str, where: str) -> Path:
        try:
            with Image.open(file) as im:
                im.load()
        except FileNotFoundError as e:
            raise DataError(f"{where}: {column} {file} does not exist; names are relative to data.root. Fix the name or add the file.") from e
        except Exception as e:  # PIL raises many types for truncated/garbage files
            raise DataError(f"{where}: cannot read {column} {file} ({type(e).__name__}: {e}); replace it with a readable image.") from e
        return file

    def _open_pair(self, winner: Path, loser: Path) -> tuple[Image.Image, Image.Image]:
        return self._open(winner), self._open(loser)

    @staticmethod
    def _open(source: Path) -> Image.Image:
        with Image.open(source) as im:
            return im.copy()


class PreferenceHF(PreferencePairs):
    """A Hugging Face data set (hub name, or local parquet / arrow files: ``data_files``) with
    Pick-a-Pic's columns (``yuvalkirstain/pickapic_v2``: ``jpg_0``/``jpg_1`` hold the encoded bytes).
    Labels are read once here (ties dropped); images are decoded per item."""

    def __init__(
        self,
        transform: ImageTransform,
        name: str | None = None,
        data_files: str | Sequence[str] | None = None,
        builder: str | None = None,
        split: str = "train",
        caption_column: str | None = "caption",
        cache_dir: str | None = None,
    ) -> None:
        from diffusion_lab.data.hf import load_hf_dataset

        super().__init__(transform)
        self.ds = load_hf_dataset(name=name, data_files=data_files, builder=builder, split=split, cache_dir=cache_dir)
        where = f"the data set {name or data_files}"
        needed = [*IMAGE_COLUMNS, LABEL_COLUMN, *([caption_column] if caption_column else [])]
        missing = [c for c in needed if c not in self.ds.column_names]
        if missing:
            raise DataError(f"{where} has no column(s) {missing} (columns: {self.ds.column_names}); a preference data set needs {needed}.")
        captions = self.ds[caption_column] if caption_column else [None] * len(self.ds)
        for i, (label, caption) in enumerate(zip(self.ds[LABEL_COLUMN], captions)):
            self._keep((i, IMAGE_COLUMNS[0]), (i, IMAGE_COLUMNS[1]), check_label(label, f"{where}, row {i}"), None if caption is None else str(caption))
        self._check_not_empty(where)

    def _open_pair(self, winner: tuple[int, str], loser: tuple[int, str]) -> tuple[Image.Image, Image.Image]:
        i = winner[0]
        row = self.ds[i]  # one read of the row: both images of the pair
        return self._decode(row[winner[1]], i, winner[1]), self._decode(row[loser[1]], i, loser[1])

    @staticmethod
    def _decode(value: Any, i: int, column: str) -> Image.Image:
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict):  # the datasets Image feature undecoded: {"bytes": ..., "path": ...}
            value = value.get("bytes") or open(value["path"], "rb").read()
        try:
            return Image.open(io.BytesIO(value))
        except Exception as e:
            raise DataError(f"row {i} of the preference data set: cannot decode {column} ({type(e).__name__}: {e}).") from e
