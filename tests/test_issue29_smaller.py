"""Issue 29, "Also seen, smaller": the GPU recipes offline name every download they need in one
message before anything is loaded; curves.png at the end of any run that logged a loss; library noise
that is known to be harmless here is filtered."""

from __future__ import annotations

import time

import pytest

from diffusion_lab.components.pretrained import check_hub_downloads, hub_ids_used
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import compose_cfg

RECIPES = {
    "sdxl_lora": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd3_lora": "stabilityai/stable-diffusion-3.5-medium",
    "flux_lora": "black-forest-labs/FLUX.1-dev",
    "controlnet_sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}
DATA = "lambdalabs/naruto-blip-captions"


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An offline hub whose cache holds nothing (whatever this machine has downloaded)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return tmp_path / "hub"


# ---- the GPU recipes offline: one message with the weights and the data set ---------------------------
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_gpu_recipe_offline_names_weights_and_data_in_one_message(recipe, tmp_path, empty_hub_cache):
    """It failed first on the data set alone, after ~30 s of hub retries; the weights came next run."""
    from diffusion_lab.train import train

    cfg = compose_cfg("train", [f"experiment={recipe}"], tmp_path / "run")
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        train(cfg)  # raised before the datamodule, the model or the trainer (a GPU one) is built
    assert time.monotonic() - start < 10  # no retries
    msg = str(err.value)
    assert "\n" not in msg and msg.count("hf download") == 2, msg
    assert f"hf download {RECIPES[recipe]} --local-dir DIR`, then set model.pretrained=DIR" in msg
    assert f"hf download {DATA} --repo-type dataset --local-dir DIR`, then set data.data_files='DIR/**/*.parquet'" in msg
    assert "(data.name)" in msg and "HF_HUB_OFFLINE=1" in msg


def test_hub_ids_follow_interpolations_to_the_key_a_user_sets(tmp_path):
    cfg = compose_cfg("train", ["experiment=sdxl_lora", "vae=sd_ft_mse"], tmp_path / "run")
    used = hub_ids_used(cfg)
    assert set(used) == {(RECIPES["sdxl_lora"], "model"), ("stabilityai/sd-vae-ft-mse", "model"), (DATA, "dataset")}
    assert used[(RECIPES["sdxl_lora"], "model")]["keys"] == ["model.pretrained"]
    assert used[("stabilityai/sd-vae-ft-mse", "model")]["keys"] == ["vae.vae.pretrained"]
    assert {"unet", "text_encoder_2", "scheduler"} <= used[(RECIPES["sdxl_lora"], "model")]["subfolders"]


def test_local_copies_and_cached_repos_pass(tmp_path, empty_hub_cache):
    """Local folders and local files are never hub ids; a repo in the hub cache (with the subfolders
    used) is fine offline; local_files_only=true alone is offline for its own keys."""
    import diffusion_lab.components.tiny as tiny

    folder = tiny.build(tmp_path / "tiny_sd")
    (tmp_path / "parquet").mkdir()
    cfg = compose_cfg("train", ["experiment=controlnet_sd15", f"model.pretrained={folder}", f"data.data_files={tmp_path / 'parquet'}/*.parquet"], tmp_path / "run")
    assert hub_ids_used(cfg) == {}
    check_hub_downloads(cfg)

    # the weights in the hub cache (a snapshot with the pipeline's subfolders), the data set not
    repo = empty_hub_cache / "models--stable-diffusion-v1-5--stable-diffusion-v1-5"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (repo / "snapshots" / "abc" / sub).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    cfg = compose_cfg("train", ["experiment=controlnet_sd15"], tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        check_hub_downloads(cfg)
    assert str(err.value).count("hf download") == 1 and DATA in str(err.value)
    # ... and datasets' own prepared copy counts for the data set
    (tmp_path / "datasets" / "lambdalabs___naruto-blip-captions").mkdir(parents=True)
    check_hub_downloads(cfg)


def test_local_files_only_without_hf_hub_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = compose_cfg("train", ["experiment=sdxl_lora", "model.local_files_only=true", f"data.data_files={tmp_path}/*.parquet"], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"local_files_only=true\): \(1\) the model stabilityai/stable-diffusion-xl-base-1.0 \(model.pretrained\)"):
        check_hub_downloads(cfg)
    cfg = compose_cfg("train", ["experiment=sdxl_lora", f"data.data_files={tmp_path}/*.parquet"], tmp_path / "run")
    check_hub_downloads(cfg)  # online: the hub fetches it


# ---- curves.png at the end of any run that logged a training loss ----------------------------------------
def test_curves_png_is_drawn_at_the_end_of_a_run_shorter_than_the_validation_interval(train_cfg):
    """README: every run dir gets curves.png; it appeared only once a validation ran (default every 500 steps)."""
    import json
    from pathlib import Path

    from diffusion_lab.train import train

    cfg = train_cfg("trainer.max_steps=3", "trainer.val_check_interval=500", "callbacks.sample_grid=null", "callbacks.noising_strip=null")
    train(cfg)
    out = Path(cfg.paths.output_dir)
    assert (out / "curves.png").stat().st_size > 0
    history = json.loads((out / "curves.json").read_text())
    assert [row["step"] for row in history] == [3] and "train/loss" in history[0] and "val/loss" not in history[0]
