"""Hydra multiruns as researchers launch them (real subprocesses, offline W&B read back from its
run files), the Optuna sweeper, and the metric train() returns."""

from __future__ import annotations

import pytest
import yaml
from omegaconf import OmegaConf

from diffusion_lab.train import train
from diffusion_lab.utils.ddp_jobs import _child_argv
from diffusion_lab.utils.results import optimized_metric

from tests.multiproc import run_cli, tiny
from tests.wandb_offline import find_offline_runs

# fast_dev_run would replace every logger by Lightning's DummyLogger (nothing reaches W&B), so
# the "fast" runs here are one optimizer step plus one validation batch instead.
ONE_STEP = ["trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.limit_val_batches=1", "callbacks.sample_grid.every_n_steps=0"]


def test_multirun_one_wandb_group_distinct_names_and_a_failed_run_does_not_stop_it(tmp_path):
    sweep = tmp_path / "sweep"
    # the middle job fails inside training (after W&B started: a config error would stop it before);
    # the third must still run. CrashOnRank(rank=-1 / -2) never crashes, rank=0 crashes at step 0.
    crash = ["+callbacks.crash._target_=tests.multiproc.CrashOnRank", "+callbacks.crash.rank=-1,0,-2"]
    args = ["-m", *tiny("logger=wandb", *ONE_STEP), *crash, f"hydra.sweep.dir={sweep}", "tags=[sweep_test]"]
    proc = run_cli(args, tmp_path)
    assert proc.returncode != 0 and "simulated crash of rank 0 at step 0" in proc.stderr  # reported at the end

    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["sweep"]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2"]
    runs = find_offline_runs(sweep)
    assert [r.path.parents[1].name for r in runs] == ["0", "1", "2"]  # one W&B run per job, in its own folder
    assert [r.name for r in runs] == ["#0 rank=-1", "#1 rank=0", "#2 rank=-2"]
    assert {r.group for r in runs} == {"train-sweep"}  # <task_name>-<sweep folder>
    assert all(r.tags == ["sweep_test"] for r in runs)
    assert [r.exit_code for r in runs] == [0, 1, 0]  # the failed run was finished, marked failed
    # the whole resolved config is the run config
    assert runs[2].config["callbacks"]["crash"]["rank"] == -2 and runs[2].config["process"]["loss_weighting"] == "none"
    assert runs[2].config["paths"]["output_dir"] == str(sweep / "2")
    assert runs[2].config["logger"]["wandb"]["group"] == "train-sweep"
    # the run after the failure trained, logged and exported
    assert runs[2].metric("val/loss") and runs[2].metric("train/loss")
    assert (sweep / "2" / "pipeline" / "model_index.json").is_file() and not (sweep / "1" / "pipeline").exists()


@pytest.mark.slow  # minutes of multi-process or wheel work: make test-slow
def test_optuna_sweep_of_two_trials(tmp_path):
    sweep = tmp_path / "optuna"
    args = [*tiny(*ONE_STEP, "data.batch_size=choice(8,16)"), "hparams_search=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # only what val/loss can compare (not the prediction type or the noise schedule)
    assert set(results["best_params"]) == {"model.optimizer.lr", "data.batch_size"}
    # the value Optuna ranked is what each trial's train() returned: its final val/loss
    import pandas as pd

    finals = [pd.read_csv(sweep / j / "csv" / "metrics.csv")["val/loss"].dropna().iloc[-1] for j in ("0", "1")]
    assert results["best_value"] == pytest.approx(min(finals))
    for j in ("0", "1"):
        trial = OmegaConf.load(sweep / j / "config.yaml")
        assert 1e-4 <= trial.model.optimizer.lr <= 3e-3 and trial.data.batch_size in (8, 16)


def test_train_returns_the_configured_metric(train_cfg):
    cfg = train_cfg("optimized_metric=train/loss", "trainer.max_steps=2", "callbacks.sample_grid=null", "callbacks.noising_strip=null")
    metric, objects = train(cfg)
    trainer = objects["trainer"]
    assert metric == pytest.approx(float(trainer.callback_metrics["train/loss"]))
    assert optimized_metric(OmegaConf.create({"optimized_metric": "val/loss"}), trainer) == pytest.approx(float(trainer.callback_metrics["val/loss"]))
    assert optimized_metric(OmegaConf.create({"optimized_metric": None}), trainer) is None
    assert optimized_metric(OmegaConf.create({"optimized_metric": "fid"}), trainer) is None  # single run: warn, not fail


def test_ddp_children_get_the_jobs_overrides_not_the_sweep():
    hc = OmegaConf.create({"overrides": {"task": ["model.optimizer.lr=0.001", "trainer=ddp_cpu", "hparams_search=optuna"]}})
    argv = ["/x/train.py", "-m", "--config-name", "train", "model.optimizer.lr=1e-3,2e-3", "trainer=ddp_cpu", "hparams_search=optuna"]
    assert _child_argv(argv, hc) == [
        "/x/train.py", "--config-name", "train", "model.optimizer.lr=0.001", "trainer=ddp_cpu", "hparams_search=optuna", "hydra.mode=RUN",
    ]
