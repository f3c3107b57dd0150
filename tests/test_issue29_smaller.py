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
    import diffusion_lab.testing.tiny as tiny

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


# ---- library noise known to be harmless here ---------------------------------------------------------------
@pytest.fixture
def diffusers_pipeline_log():
    """What diffusers' pipeline_utils logger lets through (its library root logger does not propagate)."""
    import logging

    class Keep(logging.Handler):
        records: list[str] = []

        def emit(self, record):
            self.records.append(record.getMessage())

    logger, handler = logging.getLogger("diffusers.pipelines.pipeline_utils"), Keep()
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


def test_pixel_dit_pipeline_saves_and_loads_without_noise(tmp_path, diffusers_pipeline_log):
    """The pixel DiT export (a DiTPipeline without VAE, export/pipelines.py) logged "self.vae=None ... cannot be
    saved", and loading it back for sampling "Expected types for id2label"; other warnings of the logger still pass."""
    import logging

    from diffusers import DDIMScheduler, DiffusionPipeline, DiTPipeline, DiTTransformer2DModel

    net = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=1, sample_size=8,
                                patch_size=2, num_embeds_ada_norm=11, norm_num_groups=1)
    pipe = DiTPipeline(transformer=net, vae=None, scheduler=DDIMScheduler())
    pipe.register_to_config(id2label={str(i): str(i) for i in range(10)})
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe", vae=None)
    assert loaded.labels == {str(i): i for i in range(10)}  # the string keys are converted: the warning was noise
    assert not [m for m in diffusers_pipeline_log if "cannot be saved" in m or "Expected types" in m], diffusers_pipeline_log
    logging.getLogger("diffusers.pipelines.pipeline_utils").warning("self.backbone=object() of type <class 'object'> cannot be saved.")
    assert diffusers_pipeline_log[-1].startswith("self.backbone=object()")  # a part that is really lost still shows


def test_frozen_parts_in_eval_mode_are_not_reported_and_hold_no_trainable_parameter(tmp_path):
    """Lightning warned "Found 372 module(s) in eval mode at the start of training" on ControlNet; the filter is
    right only while every module in eval mode at that point is frozen."""
    import warnings

    import pytorch_lightning as pl

    import diffusion_lab.testing.tiny as tiny
    import diffusion_lab.train as entry
    from diffusion_lab.utils.quiet import quiet_known_noise

    seen: dict[str, list] = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, module):  # the state Lightning inspected just before this hook
            seen["eval"] = [n for n, m in module.named_modules() if not m.training]
            seen["trainable"] = [n for n, m in module.named_modules() if not m.training and any(p.requires_grad for p in m.parameters(recurse=False))]

    folder = tiny.build(tmp_path / "tiny_sd")
    cfg = compose_cfg("train", ["experiment=controlnet_tiny", f"model.pretrained={folder}", "trainer=cpu", "logger=csv", "trainer.max_steps=1",
                                "callbacks.progress_bar=null", "callbacks.sample_grid=null", "callbacks.noising_strip=null", "callbacks.export=null"], tmp_path / "run")
    build = entry.instantiate_callbacks
    with warnings.catch_warnings(record=True) as caught, pytest.MonkeyPatch.context() as mp:
        quiet_known_noise()  # pytest's own per-test filters go in front of the ones installed at import
        mp.setattr(entry, "instantiate_callbacks", lambda c: [*build(c), Probe()])
        entry.train(cfg)
    assert {n.split(".")[0] for n in seen["eval"]} == {"codec", "conditioner", "backbone"}  # VAE, text encoder, frozen UNet
    assert seen["trainable"] == []
    assert not [w for w in caught if "in eval mode" in str(w.message)]


def test_prepare_prints_no_litdata_account_banner(tmp_path, capfd):
    from diffusion_lab.data.shards.prepare import prepare

    out = tmp_path / "shards"
    cfg = compose_cfg("prepare", ["data.resolution=8", "data.val_fraction=0.9", f"out_dir={out}", "prepare.num_workers=1", "prepare.batch_size=64"], tmp_path / "run")
    prepare(cfg)
    printed = capfd.readouterr().out
    assert "writing" in printed and "Finished data processing" in printed  # litdata's own progress lines still print
    assert "lightning.ai" not in printed


def test_readme_offline_recipe_command_lists_every_download(tmp_path):
    """README (Troubleshooting): with HF_HUB_OFFLINE=1, `python -m diffusion_lab.train experiment=sdxl_lora` lists
    the weights and the data set at once: exit 2, one paragraph, seconds (no hub retries)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "WANDB_MODE": "offline"}
    env.pop("HF_HUB_CACHE", None), env.pop("HF_DATASETS_CACHE", None)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "diffusion_lab.train", "experiment=sdxl_lora", f"paths.output_dir={tmp_path / 'run'}"],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "hf download stabilityai/stable-diffusion-xl-base-1.0 --local-dir DIR" in proc.stderr
    assert f"hf download {DATA} --repo-type dataset --local-dir DIR" in proc.stderr
    assert time.monotonic() - start < 120
