"""Bad input is caught before training starts, with one paragraph naming the file or key and the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.errors import MissingConfigException
from PIL import Image

from diffusion_lab.data import HFImageDataset, ImageFolderDataset, ImageTransform
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError, DataError
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
HTML_PAGE = b"<!DOCTYPE html><html><head><title>429 Too Many Requests</title></head><body>rate limited</body></html>\n"


def _images(root: Path, n: int = 3, size: tuple[int, int] = (12, 12)) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(root / f"{i:02d}.png")
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(paths[-1])
    return paths


def _folder(root: Path, **kwargs) -> ImageFolderDataset:
    return ImageFolderDataset(str(root), ImageTransform(resolution=8), **kwargs)


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match=r"data\.root=.*nowhere.* is not a directory\. Point data\.root at a folder"):
        _folder(tmp_path / "nowhere")


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"contains no images \(looked recursively for \.png"):
        _folder(tmp_path)


def test_truncated_image_fails_naming_the_file_or_is_skipped_with_a_count(tmp_path):
    paths = _images(tmp_path, n=3, size=(64, 64))
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])  # a download cut short
    with pytest.raises(DataError, match=rf"cannot read image {paths[1]}.*data\.on_bad_image=skip"):
        _folder(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) of 3"):
        ds = _folder(tmp_path, on_bad_image="skip")
    assert len(ds) == 2 and ds.skipped == [paths[1]]
    assert ds[1]["pixel_values"].shape == (3, 8, 8)


def test_html_page_saved_as_parquet_is_named_with_the_fix(tmp_path):
    bad = tmp_path / "train-00000-of-00001.parquet"
    bad.write_bytes(HTML_PAGE)
    with pytest.raises(DataError, match=rf"{bad} is not a parquet file.*HTML.*Delete this cached copy.*download it again"):
        HFImageDataset(ImageTransform(resolution=8), data_files=str(tmp_path / "*.parquet"))


def test_corrupt_parquet_in_the_hub_cache_is_named(tmp_path, monkeypatch):
    """``load_dataset("nelorth/oxford-flowers")`` over a cache holding an HTML page: the message
    names the cached file, not an ArrowInvalid from deep inside ``datasets``."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "datasets--nelorth--oxford-flowers"
    bad = repo / "snapshots" / "abc123" / "data" / "train-00000-of-00001.parquet"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(HTML_PAGE)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=rf"{bad} is not a parquet file.*download it again"):
        HFImageDataset(ImageTransform(resolution=8), name="nelorth/oxford-flowers", cache_dir=str(tmp_path / "datasets"))


def test_missing_caption_column_lists_the_columns_found(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(2)]
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1]}, features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
    ds.to_parquet(str(tmp_path / "train.parquet"))
    with pytest.raises(DataError, match=r"data\.caption_column='text' is not a column .*columns: \['image', 'label'\]"):
        HFImageDataset(ImageTransform(resolution=8), data_files=str(tmp_path / "train.parquet"), caption_column="text", cache_dir=str(tmp_path / "cache"))


def test_metadata_without_the_caption_column(tmp_path):
    _images(tmp_path, n=2)
    rows = [{"file_name": f"{i:02d}.png", "caption": "a photo"} for i in range(2)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"metadata\.jsonl has no column 'text' \(columns found: \['caption', 'file_name'\]\)"):
        _folder(tmp_path, caption_column="text")


def test_misnamed_metadata_says_what_was_looked_for_and_what_was_found(tmp_path):
    _images(tmp_path, n=2)
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file_name": "00.png", "text": "a photo"}))
    with pytest.raises(DataError) as err:
        _folder(tmp_path, caption_column="text")
    msg = str(err.value)
    assert "looked for" in msg and "metadata.jsonl" in msg and "metadata.csv" in msg and "00.txt" in msg
    assert "captions.jsonl (columns: ['file_name', 'text'])" in msg
    assert "\n" not in msg  # one paragraph


def test_missing_kohya_caption_file(tmp_path):
    _images(tmp_path, n=2)
    (tmp_path / "00.txt").write_text("a photo")
    with pytest.raises(DataError, match=r"no caption for .*01\.png.*01\.txt beside the image.*Found metadata-like files: none"):
        _folder(tmp_path, caption_column="text")


def test_small_images_are_upscaled_with_one_warning_before_training(tmp_path):
    _images(tmp_path / "a", n=2, size=(5, 7))
    _images(tmp_path / "b", n=1, size=(20, 20))
    with pytest.warns(UserWarning, match=r"2 of 3 image\(s\) .* smaller than data\.resolution=8 and will be upscaled \(smallest: .*5x7\)"):
        ds = _folder(tmp_path)
    assert all(ds[i]["pixel_values"].shape == (3, 8, 8) for i in range(len(ds)))


def test_unknown_config_option_lists_the_choices(tmp_path):
    with pytest.raises(MissingConfigException) as err:
        compose_cfg("train", ["data=digitz"], tmp_path)
    msg = str(err.value)
    assert "Could not find 'data/digitz'" in msg
    assert all(choice in msg for choice in ("digits", "hf", "image_folder"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("backbone.in_channels=3", r"backbone\.in_channels=3 but the data gives 1-channel images"),
        ("backbone.out_channels=3", r"backbone\.out_channels=3 but the data gives 1-channel images"),
        ("backbone.sample_size=32", r"backbone\.sample_size=32 but the data gives 16x16 images"),
    ],
)
def test_pixel_unet_that_does_not_fit_the_data_is_refused_before_training(train_cfg, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train(train_cfg(override))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_prints_one_paragraph_not_a_traceback(tmp_path):
    """What a user sees: the DataError raised inside Hydra's instantiate, as one paragraph, exit 2."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "diffusion_lab.train", "data=image_folder", f"data.root={tmp_path / 'missing'}", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "InstantiationException" not in proc.stderr
    assert f"error: data.root='{tmp_path / 'missing'}' is not a directory" in proc.stderr


def test_misspelled_key_on_the_cli_gets_the_closest_keys(tmp_path):
    """Hydra alone says 'use +trainer.max_step=5 to append' (which the Trainer would then refuse);
    the CLI adds that the key does not exist and what it probably was."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "diffusion_lab.train", "trainer.max_step=5", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "error: trainer.max_step is not a config key" in proc.stderr and "Did you mean trainer.max_steps" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_key_hints_apply_the_group_choices_first():
    from diffusion_lab.utils.cli import unknown_key_hints

    # caption_dropout exists in the latent model only: valid after experiment=sd_finetune_tiny
    assert unknown_key_hints(["experiment=sd_finetune_tiny", "model.caption_dropout=0.1", "trainer.max_steps=3"], "train") == []
    assert unknown_key_hints(["paths.output_dir=/x", "ckpt_path=/y"], "train") == []  # ${hydra:...} values, None values
    (hint,) = unknown_key_hints(["model.caption_dropout=0.1", "+model.extra=1"], "train")
    assert hint.startswith("model.caption_dropout is not a config key ('caption_dropout' is not in model)")
    (hint,) = unknown_key_hints(["modle.optimizer.lr=3"], "train")
    assert "Did you mean model?" in hint
    assert unknown_key_hints(["model.optimizer.lr.x=3"], "train") == ["model.optimizer.lr.x: model.optimizer.lr is a value, not a section."]
