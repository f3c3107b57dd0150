"""Real multi-process DDP on CPU (gloo): two `python -m diffusion_lab.train` ranks started by
Lightning's launcher, checked against one process, resumed on another world size, and inside a
Hydra multirun. No GPU here: bf16-mixed runs on CPU, 16-mixed needs a GPU (README). FSDP2: tests/test_fsdp.py."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError

from tests.conftest import compose_cfg
from tests.multiproc import CURVE, CURVE_RTOL, PROBE, STEPS, load_probes, run_cli, start_cli, tiny
from tests.wandb_offline import find_offline_runs

@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    """The same job in one process (batch 16 on one device), run in-process."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    train(compose_cfg("train", tiny("trainer=cpu", *CURVE, *PROBE, "callbacks.sample_grid=null", "callbacks.noising_strip=null"), run_dir))
    return run_dir


def test_rank_zero_writes_everything_once(ddp_run):
    logs = ddp_run.parent
    assert sorted(p.name for p in logs.iterdir() if p.is_dir()) == ["run"]  # no second run folder from rank 1
    ckpts = sorted(p.name for p in (ddp_run / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step_000010.ckpt", "step_000020.ckpt", "step_000030.ckpt"]
    assert sorted(p.name for p in (ddp_run / "samples").iterdir()) == ["step_000010.png", "step_000020.png", "step_000030.png"]
    assert sorted(p.name for p in ddp_run.iterdir() if p.name.startswith((".pipeline", "pipeline"))) == ["pipeline"]
    assert (ddp_run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    (wandb_run,) = find_offline_runs(ddp_run)  # one W&B run, from rank 0
    assert wandb_run.exit_code == 0 and wandb_run.config["trainer"]["devices"] == 2
    assert (ddp_run / "train_ddp_process_1.log").is_file()  # rank 1 ran, in this folder
    ckpt = torch.load(ddp_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == STEPS


def test_ranks_hold_identical_weights_and_ema(ddp_run):
    r0, r1 = load_probes(ddp_run)
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    assert r0["unet"].keys() == r1["unet"].keys()
    for k in r0["unet"]:
        assert torch.equal(r0["unet"][k], r1["unet"][k]), k
    assert len(r0["ema"]) == len(r1["ema"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(r0["ema"], r1["ema"]))
    # EMA really moved away from the weights (decay warm-up), so equality is not trivial
    assert any(not torch.equal(e, w) for e, w in zip(r0["ema"], r0["unet"].values()))


def test_validation_is_reduced_and_sampler_seeded(ddp_run):
    r0, r1 = load_probes(ddp_run)
    assert r0["val_loss"] == r1["val_loss"]  # each rank saw different images: only a reduction makes them equal
    (wandb_run,) = find_offline_runs(ddp_run)
    assert wandb_run.metric("val/loss")[-1][1] == pytest.approx(r0["val_loss"])
    assert r0["sampler_is_distributed"] and r0["sampler_seed"] == r1["sampler_seed"] == 42  # cfg.seed
    shard0, shard1 = r0["sampler_order"], r1["sampler_order"]
    assert len(shard0) == len(shard1) and len(set(shard0) & set(shard1)) <= 1  # disjoint (1 padded item)
    assert not torch.equal(r0["first_noise"], r1["first_noise"])  # ranks draw their own noise


def test_two_processes_follow_one_process(ddp_run, single_run):
    (single,) = load_probes(single_run)
    r0, r1 = load_probes(ddp_run)
    # same data order: rank k's shard is every second item of the one-process order
    order = single["sampler_order"]
    assert r0["sampler_order"][:40] == order[0:80:2] and r1["sampler_order"][:40] == order[1:80:2]
    ddp_curve = [v for _, v in find_offline_runs(ddp_run)[0].metric("val/loss")]
    one_curve = pd.read_csv(single_run / "csv" / "metrics.csv")["val/loss"].dropna().tolist()
    assert len(ddp_curve) == len(one_curve) == STEPS // 10
    assert one_curve[-1] < 0.5  # it learned (from ~1.0): the comparison is not between flat lines
    assert ddp_curve == pytest.approx(one_curve, rel=CURVE_RTOL), (ddp_curve, one_curve)


def test_resume_ddp_checkpoint_in_one_process(ddp_run, train_cfg):
    """A 2-process checkpoint resumed by one process: step, EMA and optimizer state carry on."""
    ckpt = ddp_run / "checkpoints" / "last.ckpt"
    cfg = train_cfg(*tiny("trainer=cpu", f"ckpt_path={ckpt}", *CURVE, f"trainer.max_steps={STEPS + 2}", "callbacks.sample_grid=null", "callbacks.noising_strip=null"), tiny=False)
    _, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.global_step == STEPS + 2
    ema = next(cb for cb in trainer.callbacks if type(cb).__name__ == "EMACallback")
    assert ema.ema.optimization_step == STEPS + 2
    opt_state = trainer.optimizers[0].state_dict()["state"]
    assert next(iter(opt_state.values()))["step"] == STEPS + 2


def test_ddp_run_resumed_mid_epoch_ends_with_the_same_bits(ddp_run, tmp_path):
    """2 processes resumed from the step-20 checkpoint (mid-epoch) to step 30 end with exactly the
    weights and EMA of the unbroken 2-process run: per-rank RNG states, sampler position, optimizer
    and EMA all come back."""
    run_dir = tmp_path / "resumed"
    ckpt = ddp_run / "checkpoints" / "step_000020.ckpt"
    proc = run_cli(tiny("trainer=ddp_cpu", *CURVE, *PROBE, f"ckpt_path={ckpt}", f"hydra.run.dir={run_dir}"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    unbroken, resumed = load_probes(ddp_run), load_probes(run_dir)
    assert [r["global_step"] for r in resumed] == [STEPS, STEPS]
    for a, b in zip(unbroken, resumed):
        assert a["rank"] == b["rank"]
        for k in a["unet"]:
            assert torch.equal(a["unet"][k], b["unet"][k]), (a["rank"], k)
        assert all(torch.equal(x, y) for x, y in zip(a["ema"], b["ema"]))
        assert a["val_loss"] == b["val_loss"]


@pytest.mark.slow  # minutes of multi-process or wheel work: make test-slow
def test_sigterm_under_ddp_saves_on_every_rank_and_resumes_to_the_same_bits(ddp_run, tmp_path):
    """Preemption: SIGTERM to the launching process (rank 0) at step 15. Lightning forwards it to
    rank 1; both ranks finish the step, write last.ckpt together and exit 143. Resumed with 2
    processes to step 30, the run ends bit-identical to the unbroken one."""
    marker, stopped = tmp_path / "paused", tmp_path / "stopped"
    pause = f"+callbacks.pause={{_target_: tests.test_reliability.PauseAtStep, step: 15, marker: '{marker}'}}"
    proc = start_cli(tiny("trainer=ddp_cpu", *CURVE, pause, f"hydra.run.dir={stopped}"), tmp_path, tmp_path / "stopped.log")
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), (tmp_path / "stopped.log").read_text()[-3000:]
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, (tmp_path / "stopped.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    last = stopped / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 15
    assert f"SIGTERM: saved {last} at step 15" in (tmp_path / "stopped.log").read_text()

    resumed = tmp_path / "resumed"
    done = run_cli(tiny("trainer=ddp_cpu", *CURVE, *PROBE, f"ckpt_path={last}", f"hydra.run.dir={resumed}"), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for a, b in zip(load_probes(ddp_run), load_probes(resumed)):
        assert b["global_step"] == STEPS
        assert all(torch.equal(a["unet"][k], b["unet"][k]) for k in a["unet"])
        assert all(torch.equal(x, y) for x, y in zip(a["ema"], b["ema"]))


@pytest.mark.slow  # minutes of multi-process or wheel work: make test-slow
def test_multirun_with_ddp_neither_hangs_nor_duplicates(tmp_path):
    """Each job of the sweep is its own 2-process group in its own folder (Lightning re-runs the
    command line for rank 1: without utils/ddp_jobs.job_scope that would restart the whole sweep)."""
    sweep = tmp_path / "sweep"
    args = ["-m", *tiny("trainer=ddp_cpu", "logger=wandb", "data.batch_size=16", "trainer.max_steps=1", "trainer.val_check_interval=1",
                        "callbacks.sample_grid=null", "callbacks.noising_strip=null"), "model.optimizer.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(args, tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["sweep"]  # nothing under <log_dir>/train/runs
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert (sweep / job / "pipeline" / "model_index.json").is_file()
        assert (sweep / job / "train_ddp_process_1.log").is_file()
    runs = find_offline_runs(sweep)
    assert [r.name for r in runs] == ["#0 lr=0.001", "#1 lr=0.002"]
    assert [r.config["model"]["optimizer"]["lr"] for r in runs] == [1e-3, 2e-3]
    assert len({r.group for r in runs}) == 1


def test_global_batch_must_divide_by_world_size(train_cfg):
    cfg = train_cfg(*tiny("trainer=ddp_cpu", "data.batch_size=7"), tiny=False)
    datamodule = instantiate(cfg.data.datamodule)
    trainer = instantiate(cfg.trainer)  # not fitted: no processes are started
    assert trainer.world_size == 2
    datamodule.trainer = trainer
    with pytest.raises(ConfigError, match=r"data.batch_size=7 .* use e.g. data.batch_size=6"):
        datamodule.per_device_batch_size


def test_bf16_mixed_on_cpu(train_cfg):
    cfg = train_cfg("trainer.precision=bf16-mixed", "trainer.max_steps=2", "callbacks.sample_grid=null", "callbacks.noising_strip=null")
    metric, objects = train(cfg)
    assert objects["trainer"].precision == "bf16-mixed"
    assert metric is not None and torch.isfinite(torch.tensor(metric))


@pytest.mark.slow  # minutes of multi-process or wheel work: make test-slow
def test_latent_module_two_processes(tmp_path):
    """The tiny Stable Diffusion fine-tune (VAE + CLIP text encoder frozen, UNet trained) under
    2-process DDP: same weights and EMA on both ranks, one pipeline, one set of checkpoints."""
    from diffusion_lab.testing.tiny import build

    pretrained = build(tmp_path / "tiny_sd")
    run_dir = tmp_path / "run"
    args = ["experiment=sd_finetune_tiny", f"model.pretrained={pretrained}", "trainer=ddp_cpu", "data.batch_size=8", "trainer.max_steps=4",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "callbacks.sample_grid.every_n_steps=0",
            "callbacks.model_checkpoint.every_n_train_steps=2", *PROBE, f"hydra.run.dir={run_dir}"]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_probes(run_dir)
    assert r0["world_size"] == 2 and r0["global_step"] == r1["global_step"] == 4
    for k in r0["unet"]:
        assert torch.equal(r0["unet"][k], r1["unet"][k]), k
    assert all(torch.equal(a, b) for a, b in zip(r0["ema"], r1["ema"]))
    assert r0["val_loss"] == r1["val_loss"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt", "step_000002.ckpt", "step_000004.ckpt"]
    assert sorted(p.name for p in run_dir.iterdir() if "pipeline" in p.name) == ["pipeline"]
    assert (run_dir / "pipeline" / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["run", "tiny_sd"]


@pytest.mark.slow  # minutes of multi-process or wheel work: make test-slow
def test_fid_callback_under_ddp_runs_on_rank_zero_without_hanging(tmp_path):
    """callbacks=with_fid in a 2-process run: rank 0 samples and scores (no collective inside, so
    rank 1 just waits at the next gradient all-reduce), val/fid reaches the logger once per check,
    and the ranks' weights stay identical."""
    run_dir = tmp_path / "run"
    args = tiny("trainer=ddp_cpu", "callbacks=with_fid", "data.resolution=8", "trainer.max_steps=4", "callbacks.fid.every_n_steps=2",
                "callbacks.fid.num_images=16", "callbacks.fid.num_reference=64", "logger=csv", *PROBE, f"hydra.run.dir={run_dir}")
    proc = run_cli(args, tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_probes(run_dir)
    assert all(torch.equal(r0["unet"][k], r1["unet"][k]) for k in r0["unet"])
    metrics = pd.read_csv(run_dir / "csv" / "metrics.csv")
    fid = metrics.dropna(subset=["val/fid"])
    assert fid["step"].tolist() == [2, 4] and (fid["val/fid"] > 0).all() and (fid["val/kid"].notna()).all()
