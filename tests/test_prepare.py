"""``python -m diffusion_lab.prepare``: every source config written as litdata shards (real
``litdata.optimize`` worker processes), read back item for item; encoded shards; bad images; a
failed job leaves no shard set that looks complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from diffusion_lab.data.caching import cache_latents, cacheable_text_fn
from diffusion_lab.data.shards import (
    MANIFEST,
    ShardDataModule,
    read_manifest,
    write_shards,
)
from diffusion_lab.data.shards.prepare import prepare
from diffusion_lab.utils.errors import ConfigError, DataError
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
LATENT = ["model=latent_sd", "vae=tiny", "text_encoder=tiny", "backbone=sd_tiny", "process=vp_sd"]


def image_folder(root: Path, n: int = 12, bad: int | None = None, size: tuple[int, int] = (12, 10)) -> Path:
    """``n`` random RGB PNGs with captions in metadata.jsonl; image ``bad`` is garbage bytes."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = root / f"{i:03d}.png"
        if i == bad:
            path.write_bytes(b"not a png")
        else:
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)
        rows.append({"file_name": path.name, "text": f"picture {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run_prepare(tmp_path: Path, *overrides: str) -> tuple[dict, Path]:
    out = tmp_path / "shards"
    cfg = compose_cfg("prepare", [*overrides, f"out_dir={out}", "prepare.num_workers=2", "prepare.batch_size=4"], tmp_path / "run")
    return prepare(cfg), out


def source_items(tmp_path: Path, *overrides: str) -> tuple[list[dict], int]:
    dm = instantiate(compose_cfg("prepare", [*overrides, "out_dir=unused"], tmp_path / "src").data.datamodule)
    dm.setup()
    return [dm.train_set[i] for i in range(len(dm.train_set))], len(dm.val_set or [])


def stored_items(out: Path, resolution: int, channels: int, mode: str = "RGB") -> list[dict]:
    from diffusion_lab.data import ImageTransform

    dm = ShardDataModule(str(out), transform=ImageTransform(resolution, mode=mode), resolution=resolution, channels=channels, num_workers=0)
    return [dm.dataset[i] for i in range(len(dm.dataset))]


def assert_same_items(stored: list[dict], source: list[dict]) -> None:
    assert len(stored) == len(source)
    for s in stored:  # stored in source order within each worker's slice: match by index
        ref = source[int(s["index"])]
        assert torch.equal(s["pixel_values"], ref["pixel_values"])  # lossless PNG of the transform's output
        for key in ("label", "caption"):
            assert (key in s) == (key in ref) and s.get(key) == ref.get(key)


@pytest.mark.parametrize("source", ["digits", pytest.param("digits_captioned", marks=pytest.mark.slow)])
def test_prepare_digits_stores_the_source_items_exactly(tmp_path, source):
    manifest, out = run_prepare(tmp_path, f"data={source}", "data.val_fraction=0.8")
    ref, n_val = source_items(tmp_path, f"data={source}", "data.val_fraction=0.8")
    channels, mode = (1, "L") if source == "digits" else (3, "RGB")
    assert manifest["kind"] == "pixels" and manifest["channels"] == channels
    assert manifest["num_items"] == {"train": len(ref), "val": n_val}
    assert read_manifest(out)["source"]["datamodule"]["dataset"]["_target_"] == "diffusion_lab.data.DigitsDataset"
    assert_same_items(stored_items(out, manifest["resolution"], channels, mode), ref)
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]  # no temp folder left beside it


def test_prepare_image_folder_and_hf_imagefolder(tmp_path):
    images = image_folder(tmp_path / "images", n=12)
    folder = ["data=image_folder", f"data.root={images}", "data.resolution=8", "data.val_fraction=0.25"]
    manifest, out = run_prepare(tmp_path / "a", *folder)
    ref, _ = source_items(tmp_path / "a", *folder)
    assert manifest["num_items"] == {"train": 9, "val": 3}
    stored = stored_items(out, 8, 3)
    assert_same_items(stored, ref)
    assert {s["caption"] for s in stored} == {r["caption"] for r in ref}

    hf = ["data=hf", f"data.data_files={images}", "data.builder=imagefolder", "data.caption_column=text", "data.resolution=8", "data.val_fraction=0.25", "data.num_workers=0", "data.random_flip=false"]
    manifest, out = run_prepare(tmp_path / "b", *hf)
    ref, _ = source_items(tmp_path / "b", *hf)
    assert manifest["num_items"] == {"train": 9, "val": 3}
    assert_same_items(stored_items(out, 8, 3), ref)


def test_bad_image_fails_naming_the_file_or_is_skipped(tmp_path):
    images = image_folder(tmp_path / "images", n=10, bad=4)
    folder = ["data=image_folder", f"data.root={images}", "data.resolution=8", "data.val_fraction=0"]
    with pytest.raises(Exception) as raised:  # the source's own check, through hydra's InstantiationException
        run_prepare(tmp_path / "fail", *folder)
    assert isinstance(raised.value.__cause__, DataError) and "004.png" in str(raised.value.__cause__)
    assert not (tmp_path / "fail" / "shards").exists()
    manifest, out = run_prepare(tmp_path / "skip", *folder, "data.on_bad_image=skip")
    assert manifest["num_items"] == {"train": 9} and manifest["skipped"] == [str(images / "004.png")]
    assert read_manifest(out)["skipped"] == [str(images / "004.png")]


class _BreaksAt(torch.utils.data.Dataset):
    """Twelve items; item ``bad`` cannot be read (a file that broke after the source checked it)."""

    def __init__(self, bad: int) -> None:
        self.bad = bad

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> dict:
        if i == self.bad:
            raise OSError("image file is truncated")
        return {"pixel_values": torch.zeros(3, 4, 4), "label": i}


def test_failure_inside_a_worker_leaves_no_shard_set(tmp_path):
    out = tmp_path / "shards"
    with pytest.raises(DataError, match=r"item 9 of _BreaksAt: OSError: image file is truncated"):
        write_shards({"train": _BreaksAt(9)}, out, source={}, resolution=4, channels=3, num_workers=2, batch_size=2)
    assert list(tmp_path.iterdir()) == []  # neither the target nor its temp folder
    manifest = write_shards({"train": _BreaksAt(9)}, out, source={}, resolution=4, channels=3, num_workers=2, batch_size=2, on_bad_image="skip")
    assert manifest["num_items"] == {"train": 11} and manifest["skipped"] == ["item 9 of _BreaksAt"]
    with pytest.raises(ConfigError, match="exists.*prepare.overwrite=true"):
        write_shards({"train": _BreaksAt(-1)}, out, source={}, resolution=4, channels=3)


def test_encoded_shards_hold_the_modules_posteriors_and_text_states(tmp_path):
    data = ["data=digits_captioned", "data.resolution=16", "data.val_fraction=0.97"]
    manifest, out = run_prepare(tmp_path, *data, *LATENT, "prepare.encode=true")
    assert manifest["kind"] == "latents" and manifest["model"]["text_keys"] == ["encoder_hidden_states"]
    module = instantiate(compose_cfg("train", [*data, *LATENT], tmp_path / "m").model).eval()
    ref, _ = source_items(tmp_path, *data)
    dm = ShardDataModule(str(out), resolution=16, channels=3, num_workers=0)
    for i in (0, 5, len(dm.dataset) - 1):
        item = dm.dataset[i]
        src = ref[int(item["index"])]
        assert "pixel_values" not in item and item["caption"] == src["caption"]
        with torch.no_grad():
            moments = module.codec.moments(src["pixel_values"][None])[0]
            states = module.text_states([src["caption"]])["encoder_hidden_states"][0]
        torch.testing.assert_close(item["latent_moments"], moments, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(item["encoder_hidden_states"], states, rtol=1e-5, atol=1e-5)
    # model.cache=true precomputes the same tensors (one code path: data/caching.cache_latents)
    cached = cache_latents(ref, module.codec.moments, cacheable_text_fn(module), "cpu", batch_size=4, progress=False)
    for i in range(len(dm.dataset)):
        item = dm.dataset[i]
        for key in ("latent_moments", "encoder_hidden_states"):
            torch.testing.assert_close(item[key], cached[int(item["index"])][key], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="prepare.encode=true stores VAE latents: it needs a latent model"):
        run_prepare(tmp_path / "pixel", *data, "prepare.encode=true")


@pytest.mark.slow  # two CLI processes: ~1 min of imports on a shared machine
def test_cli_writes_shards_and_prints_the_train_command(tmp_path):
    out = tmp_path / "shards"
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion_lab.prepare", "data=digits", "data.val_fraction=0.5", f"out_dir={out}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"data=shards data.root={out} data.resolution=16 data.channels=1" in proc.stdout
    assert (out / MANIFEST).is_file() and "Progress" in proc.stderr + proc.stdout
    again = subprocess.run(
        [sys.executable, "-m", "diffusion_lab.prepare", "data=digits", f"out_dir={out}", f"hydra.run.dir={tmp_path / 'run2'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 2 and "prepare.overwrite=true" in again.stderr


@pytest.mark.parametrize("source", ["digits", "digits_captioned", "image_folder", "hf"])
@pytest.mark.parametrize("model", ["pixel_ddpm", "latent_sd", "latent_sdxl"])
def test_prepare_config_composes_with_every_source_and_family(tmp_path, source, model):
    extra = ["data.root=/images"] if source == "image_folder" else []
    cfg = compose_cfg("prepare", [f"data={source}", f"model={model}", "out_dir=/shards", *extra], tmp_path)
    assert cfg.data.datamodule._target_ == "diffusion_lab.data.DiffusionDataModule"
    assert cfg.prepare.on_bad_image == ("fail" if source != "image_folder" else cfg.data.on_bad_image)
    if model != "pixel_ddpm":
        assert cfg.model.resolution == cfg.data.resolution and cfg.model.codec._target_ == "diffusion_lab.components.vae.VAECodec"
