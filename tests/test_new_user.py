"""What a new user runs first, as documented: each test is one command (or its config) that used
to fail, crash late or mislead, run with real trainers on the real configs."""

from __future__ import annotations

import warnings

import pytest
import torch

from diffusion_lab.callbacks.monitors import StepProgressBar
from diffusion_lab.train import train
from tests.conftest import TINY, compose_cfg
from tests.multiproc import tiny

QUIET = ["callbacks.sample_grid=null", "callbacks.noising_strip=null", "callbacks.export=null"]


def test_logger_none_trains(tmp_path):
    """README's `logger=none` row: the LR monitor has nowhere to log and must not stop the run."""
    cfg = compose_cfg("train", tiny("logger=none", "trainer.max_steps=2", *QUIET), tmp_path / "run")
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 2 and not objects["trainer"].loggers


def test_last_ckpt_is_written_when_training_ends_off_the_checkpoint_grid(tmp_path):
    run = tmp_path / "run"
    cfg = compose_cfg("train", tiny("trainer.max_steps=3", *QUIET), run)  # checkpoints every 2 steps
    train(cfg)
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 3  # the step the export and the last grid are from, not 2


def test_a_run_in_a_folder_with_someone_elses_last_ckpt_keeps_one_last_ckpt(tmp_path):
    run = tmp_path / "run"
    train(compose_cfg("train", tiny("trainer.max_steps=2", *QUIET), run))
    # a second run (same folder, e.g. a fixed hydra.run.dir) did not write that last.ckpt
    train(compose_cfg("train", tiny("trainer.max_steps=4", *QUIET), run))
    assert sorted(p.name for p in (run / "checkpoints").glob("last*")) == ["last.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4


def test_resuming_a_time_limited_run_trains_for_a_fresh_budget_without_the_not_resumable_warning(tmp_path):
    first = tmp_path / "first"
    limit = ["trainer.max_time=00:01:00:00", *QUIET]
    train(compose_cfg("train", tiny("trainer.max_steps=2", *limit), first))
    ckpt = first / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert "Timer" in state["callbacks"]
    state["callbacks"]["Timer"]["time_elapsed"]["train"] = 3600.0  # the first run used its whole hour
    torch.save(state, ckpt)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, objects = train(compose_cfg("train", tiny("trainer.max_steps=4", f"ckpt_path={ckpt}", *limit), tmp_path / "second"))
    assert objects["trainer"].global_step == 4  # not stopped at once on "Time limit reached"
    assert not [w for w in caught if "not resumable" in str(w.message)]  # step 2 is mid-epoch: it is resumable


@pytest.mark.parametrize("max_time", [None, "00:00:09:30"])
def test_progress_bar_counts_steps_on_step_bounded_runs(tmp_path, max_time):
    overrides = [o for o in TINY if not o.startswith("callbacks.progress_bar")] + QUIET
    overrides += [f"trainer.max_time={max_time}"] if max_time else []
    _, objects = train(compose_cfg("train", overrides, tmp_path / "run"))
    bar = next(cb for cb in objects["trainer"].callbacks if isinstance(cb, StepProgressBar))
    task = bar.train_progress_bar
    assert (task.completed, task.total) == (4, 4)  # rendered "step 4/4", not "Epoch 0/-2" and a batch count
    assert task.description == ("step (time limit 0:09:30)" if max_time else "step")


def test_a_unet_too_deep_for_the_resolution_is_one_paragraph_before_training(tmp_path):
    """README's `backbone=ddpm_flowers` on the default 16 px digits: 6 down blocks need a multiple of 32."""
    from diffusion_lab.utils.errors import ConfigError

    overrides = tiny("backbone=ddpm_flowers", "backbone.block_out_channels=[8,8,8,8,8,8]", "+backbone.norm_num_groups=4")
    with pytest.raises(ConfigError, match=r"backbone\.down_block_types\) halve the image 5 times, so data\.resolution must be a multiple of 32.*data\.resolution=32"):
        train(compose_cfg("train", overrides, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_short_grid_sweep_without_validation_succeeds_and_names_the_key(tmp_path):
    """README's `-m model.optimizer.lr=1e-4,3e-4 trainer.max_steps=5`: validation (every 500 steps)
    never runs; a grid ignores the returned metric, so the jobs must not fail over it."""
    from tests.multiproc import run_cli

    sweep = tmp_path / "sweep"
    args = ["-m", *tiny("trainer.max_steps=2", "trainer.val_check_interval=500", *QUIET), "model.optimizer.lr=1e-4,3e-4", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trainer.val_check_interval=500 is more than the 2 steps trained" in proc.stdout + proc.stderr
    assert all((sweep / j / "checkpoints" / "last.ckpt").is_file() for j in ("0", "1"))


def test_optuna_needs_the_metric_and_names_the_key(tmp_path):
    from tests.multiproc import run_cli

    sweep = tmp_path / "optuna"
    args = [*tiny("trainer.max_steps=2", "trainer.val_check_interval=500", *QUIET), "hparams_search=optuna", "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(args, tmp_path)
    assert "trainer.val_check_interval=500 is more than the 2 steps trained" in proc.stdout + proc.stderr + (sweep / "0" / "train.log").read_text()


@pytest.mark.parametrize("typo, hint", [("sed=1", "Did you mean seed?"), ("max_stepz=5", "Did you mean trainer.max_steps?")])
def test_top_level_typo_on_the_cli_gets_the_closest_key(tmp_path, typo, hint):
    """README: every entry point names the closest keys; a top-level key, or a leaf typed without
    its section, used to get Hydra's message alone."""
    import subprocess
    import sys

    from tests.multiproc import REPO

    cmd = [sys.executable, "-m", "diffusion_lab.train", typo, f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert f"error: {typo.split('=')[0]} is not a config key" in proc.stderr and hint in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "config_name, typo, meant",
    [("sample", "num_image=4", "num_images"), ("evaluate", "images=out", "images_dir"), ("train", "data.resolutio=8", "data.resolution")],
)
def test_unknown_key_hints_at_every_entry_point(config_name, typo, meant):
    from diffusion_lab.utils.cli import unknown_key_hints

    (hint,) = unknown_key_hints([typo], config_name)
    assert "Did you mean" in hint and meant in hint.split("Did you mean", 1)[1].split("?")[0]


@pytest.mark.parametrize("old", ["scheduler=ddim", "scheduler.prediction_type=v_prediction"])
def test_the_old_scheduler_key_names_its_replacements(old):
    """Commands from before the processes redesign say what scheduler= became."""
    from diffusion_lab.utils.cli import unknown_key_hints

    (hint,) = unknown_key_hints([old], "train")
    assert "process=" in hint and "sampler=" in hint and "Did you mean" not in hint


def test_a_group_at_package_choice_is_not_taken_for_a_misspelled_key():
    """README's `optimizer@model.optimizer=adamw_8bit` swaps a group into another package: when a
    typo elsewhere fails the command, only the typo is named, not the swap."""
    from diffusion_lab.utils.cli import unknown_key_hints

    hints = unknown_key_hints(["optimizer@model.optimizer=adamw_8bit", "model.optimizer.lr=3e-4", "trainer.max_stepz=5"], "train")
    assert len(hints) == 1 and hints[0].startswith("trainer.max_stepz is not a config key"), hints
    assert "Did you mean trainer.max_steps" in hints[0]


def test_tiny_component_factories_leave_the_run_seed_in_charge(tmp_path):
    """`seed=` must change the training noise of runs that build vae=tiny / backbone=sd_tiny:
    the factories seed their weights without resetting the global RNG after seed_everything."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from diffusion_lab.testing.tiny import tiny_unet, tiny_vae

    cfg = compose_cfg("train", ["model=latent_sd", "vae=tiny", "text_encoder=tiny", "backbone=sd_tiny"], tmp_path)
    draws = []
    for seed in (1, 2):
        pl.seed_everything(seed)
        instantiate(cfg.vae.vae)
        draws.append(torch.randn(4))  # what the first training step's noise would start from
    assert not torch.equal(draws[0], draws[1])

    state = torch.get_rng_state()
    first = tiny_unet(seed=3).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, tiny_unet(seed=3).state_dict()[k]) for k, v in first.items())  # still seeded weights
    assert torch.equal(torch.get_rng_state(), state) and tiny_vae(seed=0) is not None


def _captioned_folder(root, columns: dict[str, str] | None) -> list[str]:
    """8 RGB images with a metadata.jsonl of ``file_name`` + ``columns`` (None: no metadata)."""
    import json

    import numpy as np
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", **{k: v.format(i=i) for k, v in (columns or {}).items()}})
    if columns is not None:
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["data=image_folder", f"data.root={root}", "data.resolution=16", "data.num_workers=0", "data.val_fraction=0.25", "data.batch_size=2"]


@pytest.fixture(scope="module")
def tiny_sd_folder(tmp_path_factory):
    from diffusion_lab.testing.tiny import build

    return str(build(tmp_path_factory.mktemp("tiny") / "tiny_sd", resolution=16))


SD_FAST = ["experiment=sd_finetune_tiny", "trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks.sample_grid=null", "callbacks.export=null"]


def test_sd_finetune_reads_the_text_column_of_metadata_jsonl_without_being_told(tmp_path, tiny_sd_folder, caplog):
    """diffusers' train_text_to_image.py convention: file_name + text, no data.caption_column."""
    import logging

    data = _captioned_folder(tmp_path / "images", {"text": "a picture number {i}"})
    with caplog.at_level(logging.INFO, logger="diffusion_lab"):
        _, objects = train(compose_cfg("train", [*SD_FAST, f"model.pretrained={tiny_sd_folder}", *data], tmp_path / "run"))
    assert objects["trainer"].global_step == 2
    assert objects["datamodule"].dataset[3]["caption"] == "a picture number 3"
    assert "captions: column 'text'" in caplog.text


@pytest.mark.parametrize("columns", [None, {"text": "a {i}", "caption": "b {i}"}])
def test_sd_finetune_without_usable_captions_fails_before_training(tmp_path, tiny_sd_folder, columns):
    from diffusion_lab.utils.errors import DataError

    data = _captioned_folder(tmp_path / "images", columns)
    with pytest.raises(DataError, match=r"trains on image-caption pairs but the data has no captions .*data\.caption_column"):
        train(compose_cfg("train", [*SD_FAST, f"model.pretrained={tiny_sd_folder}", *data], tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_prints_no_library_noise_and_its_log_lines_reach_train_log(tmp_path):
    """The torchvision hint (README says not to install it), the litlogger tip, the LeafSpec
    deprecation and wandb's "anonymous setting" used to print on every run; train.log stayed empty."""
    from tests.multiproc import run_cli

    run = tmp_path / "run"
    proc = run_cli([*tiny("logger=wandb", "trainer.max_steps=2", "trainer.val_check_interval=2", *QUIET), f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    for noise in ("requires torchvision", "litlogger", "LeafSpec", "anonymous setting", "torch_dtype` is deprecated"):
        assert noise not in out, noise
    log = (run / "train.log").read_text()
    assert "Seed set to 42" in log and "`Trainer.fit` stopped: `max_steps=2` reached." in log  # Lightning's own lines


def test_offline_sdxl_refiner_recipe_says_how_to_get_the_models(tmp_path):
    """Regression: `recipe=sdxl_refiner` offline said the hub id "has no readable model_index.json"."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "diffusion_lab.sample", "recipe=sdxl_refiner", "prompt=a lighthouse", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "hf download stabilityai/stable-diffusion-xl-base-1.0 --local-dir DIR" in res.stderr
    assert "set pipeline=DIR" in res.stderr
