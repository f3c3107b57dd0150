"""The image folder's items: which files, in which order, with which captions, paired images and
masks, whatever the captions come from (metadata.jsonl, metadata.csv, .txt beside each image)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffusion_lab.data import ImageFolderDataset, ImageTransform
from diffusion_lab.data.image_folder import MASK_SUFFIX
from diffusion_lab.utils.errors import DataError

# relative path -> grey level of a solid 12x10 image: each item's pixels tell which file it came from
IMAGES = {"b.png": 40, "a.png": 90, "sub/c.png": 140, "sub/d.jpg": 190}


def _solid(path: Path, value: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (12, 10), value if mode == "L" else (value,) * 3).save(path)


def _folder(root: Path) -> Path:
    """Four images (two in sub/), a source image for each in sources/ (the inverted grey level) and a
    loss mask (left half white) beside a.png (OneTrainer's name); sources and masks are no training images."""
    for name, value in IMAGES.items():
        _solid(root / name, value)
        _solid(root / "sources" / Path(name).with_suffix(".png").name, 255 - value)
    mask = Image.new("L", (12, 10), 0)
    mask.paste(255, (0, 0, 6, 10))  # train on the left half of a.png
    mask.save(root / ("a" + MASK_SUFFIX))
    return root


def _value(pixels: torch.Tensor) -> int:
    """The grey level of a solid image back from ``[C, H, W]`` in [-1, 1]."""
    return round(((pixels.mean().item() + 1) / 2) * 255)


def _items(ds: ImageFolderDataset) -> list[tuple]:
    """(file, grey level, caption, source grey level, mask mean) of every item, in order."""
    out = []
    for i in range(len(ds)):
        item = ds[i]
        source = _value(item["source_pixel_values"]) if "source_pixel_values" in item else None
        mask = round(item["mask"].mean().item(), 1) if "mask" in item else None
        out.append((ds.files[i].relative_to(ds.root).as_posix(), _value(item["pixel_values"]), item.get("caption"), source, mask))
    return out


SORTED = ["a.png", "b.png", "sub/c.png", "sub/d.jpg"]  # the order of the items: the files, sorted


def test_jsonl_metadata_captions_paired_images_and_masks(tmp_path):
    """Rows in another order than the files; a row naming a sub-folder image by its base name only;
    an extra number column; captions with quotes and commas; a ``*_file_name`` column as a paired image."""
    root = _folder(tmp_path / "data")
    captions = {"b.png": 'a "b", quoted', "a.png": "cap a", "sub/c.png": "cap c", "sub/d.jpg": "  cap d  "}
    rows = [{"file_name": name if name != "sub/c.png" else "c.png", "text": captions[name], "score": k,
             "source_file_name": "sources/" + Path(name).with_suffix(".png").name} for k, name in enumerate(reversed(IMAGES))]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ImageFolderDataset(str(root), ImageTransform(resolution=8), caption_column="auto",
                            paired_images={"source_file_name": "source_pixel_values"}, masks=True)
    assert _items(ds) == [(n, IMAGES[n], captions[n], 255 - IMAGES[n], 0.5 if n == "a.png" else 1.0) for n in SORTED]
    assert ds.paired_keys == ("source_pixel_values", "mask")
    explicit = ImageFolderDataset(str(root), ImageTransform(resolution=8), caption_column="text", paired_images={"source_file_name": "source_pixel_values"})
    assert explicit.captions == [captions[n] for n in SORTED]


def test_csv_metadata_captions_and_paired_images(tmp_path):
    root = _folder(tmp_path / "data")
    (root / ("a" + MASK_SUFFIX)).unlink()
    lines = ["file_name,caption,source_image"] + [f'{n},"{n[:-4]}, in a ""csv""",sources/{Path(n).with_suffix(".png").name}' for n in reversed(IMAGES)]
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    ds = ImageFolderDataset(str(root), ImageTransform(resolution=8), caption_column="caption", paired_images={"source_image": "source_pixel_values"})
    assert _items(ds) == [(n, IMAGES[n], f'{n[:-4]}, in a "csv"', 255 - IMAGES[n], None) for n in SORTED]
    auto = ImageFolderDataset(str(root), ImageTransform(resolution=8), caption_column="auto", paired_images={"source_image": "source_pixel_values"})
    assert auto.captions == ds.captions  # caption is picked by name; the paired column is never the caption


def test_metadata_jsonl_wins_over_csv_and_txt_captions_are_the_fallback(tmp_path):
    root = _folder(tmp_path / "data")
    for source in (root / "sources").iterdir():
        source.unlink()  # without paired images, these would be training images
    for n in IMAGES:
        (root / n).with_suffix(".txt").write_text(f"  kohya {n}\n")
    ds = ImageFolderDataset(str(root), ImageTransform(resolution=8), caption_column="auto", masks=True)
    assert _items(ds) == [(n, IMAGES[n], f"kohya {n}", None, 0.5 if n == "a.png" else 1.0) for n in SORTED]
    (root / "metadata.csv").write_text("file_name,text\n" + "".join(f"{n},csv {n}\n" for n in IMAGES))
    assert ImageFolderDataset(str(root), ImageTransform(resolution=8), caption_column="auto").captions == [f"csv {n}" for n in SORTED]
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": f"jsonl {n}"}) + "\n" for n in IMAGES))
    assert ImageFolderDataset(str(root), ImageTransform(resolution=8), caption_column="text").captions == [f"jsonl {n}" for n in SORTED]


def test_an_image_without_a_metadata_row_is_named(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "x"}) + "\n" for n in IMAGES if n != "b.png"))
    with pytest.raises(DataError, match=r"b\.png has no row in .*metadata\.\* \(file_name column\)"):
        ImageFolderDataset(str(root), ImageTransform(resolution=8), caption_column="text")


def test_metadata_is_read_offline_and_leaves_the_hf_cache_alone(tmp_path, monkeypatch):
    """``datasets`` offline (HF_HUB_OFFLINE=1 read at import, set here on its config) still reads a
    local folder's metadata, and writes nothing to its cache: an edited metadata file is read afresh."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    for name in ("HF_DATASETS_CACHE", "HF_MODULES_CACHE"):
        monkeypatch.setattr(datasets.config, name, tmp_path / "hf" / name)
    root = _folder(tmp_path / "data")
    for source in (root / "sources").iterdir():
        source.unlink()
    for text in ("first", "edited"):
        (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": f"{text} {n}"}) + "\n" for n in IMAGES))
        assert ImageFolderDataset(str(root), ImageTransform(resolution=8), caption_column="auto").captions == [f"{text} {n}" for n in SORTED]
    assert not (tmp_path / "hf").exists()
