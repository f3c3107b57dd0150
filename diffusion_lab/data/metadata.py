"""An image folder's metadata: ``metadata.jsonl`` (else ``metadata.csv``) beside the images, one row
per image: ``file_name`` (relative to the folder), the caption and any paired-image columns. Read
by ``datasets``' imagefolder builder, as ``load_dataset("imagefolder")`` reads it (``folder_metadata``);
a folder of preference pairs (no ``file_name``) by its json / csv builder (``metadata_rows``). And
the kohya alternative: a ``.txt`` caption beside each image (``txt_captions``)."""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from diffusion_lab.data.hf import load_file
from diffusion_lab.utils.errors import DataError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # diffusers' imagefolder names; the first found is read


def metadata_file(root: Path) -> Path | None:
    """``root``'s metadata.jsonl, else its metadata.csv, else None."""
    return next((root / name for name in METADATA_FILES if (root / name).is_file()), None)


def _builder(path: Path) -> str:
    return "csv" if path.suffix == ".csv" else "json"


def _unreadable(path: Path, e: Exception) -> DataError:
    cause = e.__cause__ or e  # the json / csv builders wrap the parser's error
    return DataError(
        f"cannot read {path} ({type(cause).__name__}: {cause}). metadata.jsonl needs one JSON object per line, e.g. "
        f'{{"file_name": "0001.png", "text": "a caption"}}; metadata.csv a header line (file_name,text) and one row per image.'
    )


def table_columns(path: Path) -> list[str] | str:
    """Sorted column names of a .jsonl / .json / .csv file (for error messages), or why they are unknown."""
    try:
        return sorted(load_file(_builder(path), path).column_names)
    except Exception as e:  # any reason: this only describes a file in an error message
        cause = e.__cause__ or e
        return f"unreadable: {type(cause).__name__}"


def metadata_rows(root: Path) -> tuple[Path, list[dict]] | None:
    """(path, rows) of ``root``'s metadata file, every row holding every column (None where it has no
    value), or None when there is no metadata file."""
    path = metadata_file(root)
    if path is None:
        return None
    try:
        return path, load_file(_builder(path), path).to_list()
    except Exception as e:  # the builders raise many types for a malformed file
        raise _unreadable(path, e) from e


@dataclass
class FolderMetadata:
    """The metadata file of an image folder: its ``columns`` as written in the file, and its ``rows``
    by ``file_name`` (normalised, relative to the folder; None when the file has no ``file_name``).
    Values are the file's; ``*_file_name`` columns (which the builder reads as images) hold file
    names relative to the folder, as written."""

    path: Path
    columns: list[str]
    rows: dict[str, dict] | None

    def row(self, image: Path, root: Path) -> dict | None:
        """The row of ``image``: by its path relative to ``root``, else by its base name."""
        rows = self.rows or {}
        return rows.get(image.relative_to(root).as_posix(), rows.get(image.name))

    def captions(self, files: list[Path], root: Path, column: str) -> list[str]:
        """The ``column`` of each image's row (an empty cell: ""); a missing column or row is a DataError."""
        if self.rows is None or column not in self.columns:
            missing = "file_name" if self.rows is None else column
            raise DataError(
                f"{self.path} has no column {missing!r} (columns found: {self.columns}). The imagefolder convention "
                f"needs 'file_name' plus the caption column; set data.caption_column to one of {self.columns} "
                f"or rename the column in the file."
            )
        captions = []
        for path in files:
            row = self.row(path, root)
            if row is None:
                raise DataError(f"{path.relative_to(root).as_posix()} has no row in {root}/metadata.* (file_name column); add one or remove the image.")
            captions.append("" if row[column] is None else str(row[column]))
        return captions

    def caption_column(self, exclude: Collection[str] = ()) -> str | None:
        """The caption column when it is unambiguous: ``text`` (what diffusers' train_text_to_image.py
        reads), ``caption``, or else the only column besides ``file_name`` (and ``exclude``: the
        paired image columns) that holds strings; None without ``file_name``."""
        if self.rows is None:
            return None
        named = [c for c in ("text", "caption") if c in self.columns]
        if named:
            return named[0] if len(named) == 1 else None  # both: the user must say which
        rows = self.rows.values()
        strings = [c for c in self.columns if c != "file_name" and c not in exclude and all(isinstance(r.get(c), str) for r in rows)]
        return strings[0] if len(strings) == 1 else None


def folder_metadata(root: Path) -> FolderMetadata | None:
    """``root``'s metadata file read by ``datasets``' imagefolder builder (images not decoded), or
    None when there is none. A file without ``file_name`` gives ``rows=None``: the caller says which
    column its job needs."""
    import datasets

    path = metadata_file(root)
    if path is None:
        return None
    try:
        table = load_file("imagefolder", path)
    except Exception as e:  # the builder raises many types for a malformed file
        columns = table_columns(path)
        if isinstance(columns, list) and "file_name" not in columns:
            return FolderMetadata(path, columns, None)
        raise _unreadable(path, e) from e
    # the builder turns file_name into an image column "image" and x_file_name into "x"; name them back
    images = {c: "file_name" if c == "image" else f"{c}_file_name" for c, f in table.features.items() if isinstance(f, datasets.Image)}
    rows = {}
    for row in table.with_format("arrow")[:].to_pylist():  # image columns as {"path": ..., "bytes": None}
        row = {images.get(c, c): _relative(v["path"], root) if c in images and v else v for c, v in row.items()}
        rows[row["file_name"]] = row
    return FolderMetadata(path, sorted(images.get(c, c) for c in table.column_names), rows)


def txt_captions(files: list[Path], root: Path, caption_column: str) -> list[str]:
    """Each image's caption from the ``.txt`` file beside it (kohya), stripped; a missing one is a
    DataError saying what was looked for and which metadata-like files there are."""
    captions = []
    for path in files:
        txt = path.with_suffix(".txt")
        if not txt.exists():
            found = [f"{p.name} (columns: {table_columns(p)})" for p in sorted(root.iterdir()) if p.suffix in (".jsonl", ".csv", ".json")]
            raise DataError(
                f"no caption for {path}: looked for {root}/metadata.jsonl, {root}/metadata.csv "
                f"(diffusers imagefolder) and {txt.name} beside the image (kohya). Found metadata-like files: "
                f"{'; '.join(found) or 'none'}. Rename your metadata file to metadata.jsonl/metadata.csv (with "
                f"'file_name' and data.caption_column={caption_column!r} columns), add .txt captions, or set "
                f"data.caption_column=null to train without captions."
            )
        captions.append(txt.read_text().strip())
    return captions


def _relative(path: str, root: Path) -> str:
    """A path the builder joined to the metadata's folder, as a name relative to ``root`` (posix)."""
    return Path(os.path.relpath(path, root)).as_posix()
