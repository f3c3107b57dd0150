"""Reliability: exact resume after SIGKILL, crash-safe checkpoints, nan/inf guard, SIGTERM/Ctrl-C.

The kill tests start ``python -m diffusion_lab.train`` as a real subprocess, hold it at a chosen
point with one of the small callbacks below (the child imports this file), and SIGKILL it from
here. The resumed run and an unbroken run must end with bit-identical weights, EMA and optimizer
state (CPU, fixed seed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict
from PIL import Image

from diffusion_lab.callbacks.ema import EMACallback
from diffusion_lab.data.datamodule import ResumableSampler
from diffusion_lab.train import train
from diffusion_lab.utils.checkpoint_io import AtomicCheckpointIO
from diffusion_lab.utils.errors import ConfigError, TrainingError
from diffusion_lab.utils.io import atomic_dir
from tests.conftest import TINY, compose_cfg

ROOT = Path(__file__).resolve().parents[1]
HERE = __name__  # the callbacks below are named by _target_, also in the child process


# ---- callbacks the tests put into runs (by _target_, also in the child process) -----------------
class PauseAtStep(pl.Callback):
    """After optimizer step ``step``: write ``marker`` and wait (up to ``seconds``) until killed
    or until a signal was received (Lightning's SIGTERM flag or the Ctrl-C flag)."""

    def __init__(self, step: int, marker: str, seconds: float = 120.0) -> None:
        self.step, self.marker, self.seconds = step, marker, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            if trainer.received_sigterm or any(getattr(cb, "_signal", None) for cb in trainer.callbacks):
                return
            time.sleep(0.02)


class _HangWhenPickled:
    """Pickling it (i.e. in the middle of ``torch.save``) writes the marker and hangs."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        Path(self.marker).write_text(str(os.getpid()))
        time.sleep(120)
        return (str, ("unreachable",))


class HangInSave(pl.Callback):
    """The checkpoint written at optimizer step ``step`` hangs half-way through being written."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker
        self.trainer = None

    def setup(self, trainer, pl_module, stage) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict:
        if self.trainer is not None and self.trainer.global_step == self.step:
            return {"hang": _HangWhenPickled(self.marker)}
        return {}


class PoisonWeights(pl.Callback):
    """After step ``step`` set one UNet weight to nan (a diverged update)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.backbone.parameters()).view(-1)[0] = float("nan")


class InfGradient(pl.Callback):
    """At step ``step`` make one gradient inf (what an fp16 overflow in backward does)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.global_steps_seen: list[int] = []

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step + 1 == self.step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")


class RaiseSignal(pl.Callback):
    """Deliver ``signals`` to this process after step ``step`` (as ``kill``/Ctrl-C would)."""

    def __init__(self, step: int, signals: list[int]) -> None:
        self.step, self.signals = step, signals

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for signum in self.signals:
                signal.raise_signal(signum)


# ---- helpers ----------------------------------------------------------------------------------
def _image_folder(root: Path, n: int = 40) -> Path:
    """``n`` small random RGB images (10x12) : 4 training batches of 8 per epoch at val 10%."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


# guard and signal tests: one validation batch, no pictures, no export
QUIET = ["trainer.limit_val_batches=1", "callbacks.sample_grid=null", "callbacks.noising_strip=null", "callbacks.export=null"]


def _resume_overrides(data_root: Path) -> list[str]:
    # several epochs of a tiny folder, random crops + flips, validation, sample grids, EMA:
    # everything that could make a resumed run drift
    return [
        "data=image_folder",
        f"data.root={data_root}",
        "data.resolution=8",
        "data.crop=random",
        "data.random_flip=true",
        "data.num_workers=0",
        "data.batch_size=8",
        "data.val_fraction=0.1",
        "trainer.max_steps=12",
        "trainer.val_check_interval=5",
        "callbacks.model_checkpoint.every_n_train_steps=3",
        "callbacks.sample_grid.every_n_steps=5",
        "callbacks.noising_strip=null",
        "callbacks.export=null",
        "model.lr_scheduler.num_warmup_steps=4",
        "callbacks.ema.decay=0.9",
    ]


def _cli(overrides: list[str], out_dir: Path) -> list[str]:


    return [sys.executable, "-m", "diffusion_lab.train", *TINY, *overrides, f"hydra.run.dir={out_dir}"]


def _child_env() -> dict:
    # the same intra-op thread count as the in-process runs it is compared with (other tests change it)
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _start_and_kill(cmd: list[str], marker: Path, log: Path, inspect=None) -> None:
    """Run ``cmd``; when ``marker`` appears call ``inspect()`` (child still alive), then SIGKILL it."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not marker.exists():
                if proc.poll() is not None:
                    pytest.fail(f"child exited with {proc.returncode} before the kill point:\n{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail("child never reached the kill point")
                time.sleep(0.05)
            if inspect is not None:
                inspect()
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _final_state(objects: dict) -> dict[str, torch.Tensor]:
    """Weights, EMA weights and AdamW moments at the end of a run, flattened to name -> tensor."""
    trainer, model = objects["trainer"], objects["model"]
    state = {f"w.{k}": v for k, v in model.state_dict().items()}
    ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMACallback)).ema
    state |= {f"ema.{i}": p for i, p in enumerate(ema.shadow_params)}
    opt = trainer.optimizers[0].state_dict()["state"]
    state |= {f"opt.{i}.{k}": v for i, s in opt.items() for k, v in s.items() if torch.is_tensor(v)}
    return state


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ after resume, e.g. {different[:3]}"


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> tuple[Path, dict]:
    """(data folder, final state) of the reference run: 12 steps without interruption."""


    base = tmp_path_factory.mktemp("unbroken")
    data = _image_folder(base / "images")
    _, objects = train(compose_cfg("train", TINY + _resume_overrides(data), base / "run"))
    assert objects["trainer"].global_step == 12
    assert objects["trainer"].current_epoch >= 2  # the resumed runs cross epoch boundaries
    return data, _final_state(objects)


# ---- exact resume -------------------------------------------------------------------------------
@pytest.mark.parametrize("kill_at", ["mid_step", "mid_save"])
def test_sigkilled_run_resumes_bit_identical(unbroken, train_cfg, tmp_path, kill_at):
    """mid_step: SIGKILL after step 7 (last checkpoint: step 6, mid epoch 1).
    mid_save: SIGKILL while the step-6 checkpoint is being written; the step-3 one must be whole."""
    data, reference = unbroken
    killed = tmp_path / "killed"
    marker = tmp_path / "marker"
    ckpts = killed / "checkpoints"
    if kill_at == "mid_step":
        extra = [f"+callbacks.pause={{_target_: {HERE}.PauseAtStep, step: 7, marker: '{marker}'}}"]
        resume_step, inspect = 6, None
    else:
        extra = [f"+callbacks.hang={{_target_: {HERE}.HangInSave, step: 6, marker: '{marker}'}}"]
        resume_step = 3

        def inspect():  # the child is half-way through writing step_000006.ckpt
            assert not (ckpts / "step_000006.ckpt").exists()
            assert list(ckpts.glob(".step_000006.ckpt.tmp-*")), "the checkpoint is not staged beside its target"

    _start_and_kill(_cli(_resume_overrides(data) + extra, killed), marker, tmp_path / "child.log", inspect)

    last = ckpts / "last.ckpt"
    assert _ckpt(last)["global_step"] == resume_step  # whole and loadable
    cfg = train_cfg(*_resume_overrides(data), f"ckpt_path={last}")
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 12
    _assert_identical(reference, _final_state(objects))
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.tmp-*"))


def test_sampler_resumes_mid_epoch_and_reshuffles_each_epoch():
    ds = list(range(50))
    full = ResumableSampler(ds, num_replicas=2, rank=1, seed=7, epoch=3)
    order = list(full)
    resumed = ResumableSampler(ds, num_replicas=2, rank=1, seed=7, epoch=3, start=10)
    assert list(resumed) == order[10:]
    assert len(resumed) == len(order) == 25  # Lightning counts the whole epoch
    resumed.set_epoch(4)
    assert list(resumed) != order and len(list(resumed)) == 25  # new permutation, from the start
    other_rank = ResumableSampler(ds, num_replicas=2, rank=0, seed=7, epoch=3)
    assert not {i for _, i in other_rank} & {i for _, i in order}  # ranks never share items


# ---- crash-safe writes --------------------------------------------------------------------------
def test_checkpoint_write_is_staged_beside_target_and_failure_keeps_old(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self):
            # mid-save: the target is still the old file and the new one is written next to it
            assert _ckpt(path)["step"] == 1
            assert len(list(tmp_path.glob(".last.ckpt.tmp-*"))) == 1
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2, "bad": Boom()}, path)
    assert _ckpt(path)["step"] == 1
    assert not list(tmp_path.glob(".last.ckpt.tmp-*"))
    (tmp_path / ".last.ckpt.tmp-deadbeef").write_bytes(b"half")  # left by a SIGKILLed writer
    io.save_checkpoint({"step": 3}, path)
    assert _ckpt(path)["step"] == 3 and not list(tmp_path.glob(".last.ckpt.tmp-*"))


def test_export_that_fails_half_way_leaves_the_previous_pipeline_whole(tmp_path):
    target = tmp_path / "pipeline"
    with atomic_dir(target) as tmp:
        (Path(tmp) / "model.safetensors").write_bytes(b"v1")
    with pytest.raises(RuntimeError, match="killed"), atomic_dir(target) as tmp:
        (Path(tmp) / "model.safetensors").write_bytes(b"v2 half")
        assert (target / "model.safetensors").read_bytes() == b"v1"  # untouched while writing
        raise RuntimeError("killed")
    assert (target / "model.safetensors").read_bytes() == b"v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]


def test_truncated_checkpoint_is_refused_before_training(train_cfg, tmp_path):
    bad = tmp_path / "ckpts" / "last.ckpt"
    bad.parent.mkdir()
    bad.write_bytes(b"PK\x03\x04 cut short")
    (tmp_path / "ckpts" / "step_000002.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"not a whole checkpoint.*step_000002\.ckpt"):
        train(train_cfg(f"ckpt_path={bad}"))
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---- nan / inf ----------------------------------------------------------------------------------
def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(train_cfg, tmp_path):
    cfg = train_cfg("trainer.max_steps=6", *QUIET)
    with open_dict(cfg):
        cfg.callbacks.poison = {"_target_": f"{HERE}.PoisonWeights", "step": 3}
    with pytest.raises(TrainingError, match=r"loss is nan at step 4 .*last good checkpoint is .*last\.ckpt"):
        train(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    last = _ckpt(ckpts / "last.ckpt")
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert not (ckpts / "step_000004.ckpt").exists()


def test_inf_gradient_stops_fp32_run_before_the_update(train_cfg):
    cfg = train_cfg("trainer.max_steps=4", *QUIET)
    with open_dict(cfg):
        cfg.callbacks.inf = {"_target_": f"{HERE}.InfGradient", "step": 2}
    with pytest.raises(TrainingError, match="gradient is nan/inf at step 2"):
        train(cfg)


def test_fp16_overflow_is_left_to_the_loss_scaler(train_cfg):
    """A real fp16 autocast + GradScaler run (on CPU): the overflowing step is skipped, the scale
    halves, and training goes on to the end with finite weights."""
    cfg = train_cfg("trainer.max_steps=4", "trainer.precision=null", *QUIET)
    with open_dict(cfg):
        cfg.callbacks.inf = {"_target_": f"{HERE}.InfGradient", "step": 2}
        cfg.trainer.plugins.append(
            {"_target_": "pytorch_lightning.plugins.MixedPrecision", "precision": "16-mixed", "device": "cpu", "scaler": {"_target_": "torch.amp.GradScaler", "device": "cpu"}}
        )
    _, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.global_step == 4
    assert trainer.precision_plugin.scaler.get_scale() < 65536.0  # the scaler saw the overflow
    assert all(torch.isfinite(p).all() for p in objects["model"].parameters())


# ---- signals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_checkpoint_then_stops(train_cfg, tmp_path, signum, capsys):
    sigint_before = signal.getsignal(signal.SIGINT)
    cfg = train_cfg("trainer.max_steps=8", "callbacks.model_checkpoint.every_n_train_steps=100", *QUIET[:-1])
    with open_dict(cfg):
        cfg.callbacks.signal_at = {"_target_": f"{HERE}.RaiseSignal", "step": 3, "signals": [int(signum)]}
    with pytest.raises(SystemExit) as stop:
        train(cfg)
    assert stop.value.code == 128 + signum
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert _ckpt(last)["global_step"] == 3
    assert f"saved {last} at step 3; resume with ckpt_path={last}" in capsys.readouterr().err
    assert not (tmp_path / "run" / "pipeline").exists()  # stopped, not finished: no export (it is on here)
    assert signal.getsignal(signal.SIGINT) is sigint_before


def test_second_ctrl_c_aborts_without_saving(train_cfg, tmp_path):
    cfg = train_cfg("trainer.max_steps=8", "callbacks.model_checkpoint.every_n_train_steps=100", *QUIET)
    with open_dict(cfg):
        cfg.callbacks.signal_at = {"_target_": f"{HERE}.RaiseSignal", "step": 2, "signals": [int(signal.SIGINT)] * 2}
    with pytest.raises(SystemExit) as stop:  # Lightning turns the KeyboardInterrupt into exit code 1
        train(cfg)
    assert stop.value.code == 1
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


# ---- data order and augmentation ----------------------------------------------------------------
def test_augmented_batches_do_not_depend_on_workers_or_resume_point(tmp_path):
    """Random crops + flips: the same batches with 0 or 2 worker processes, and a loader resumed
    after 2 batches (from the datamodule's saved state) yields exactly the remaining ones."""
    from hydra.utils import instantiate

    data = _image_folder(tmp_path / "images")
    cfg = compose_cfg("train", TINY + _resume_overrides(data), tmp_path / "run")

    def batches(num_workers: int, state: dict | None = None) -> list[torch.Tensor]:
        dm = instantiate(cfg.data.datamodule, num_workers=num_workers)
        if state:
            dm.load_state_dict(state)
        dm.setup()
        return [b["pixel_values"] for b in dm.train_dataloader()]

    plain = batches(0)
    assert len(plain) == 4 and not torch.equal(plain[0], plain[1])
    assert all(torch.equal(a, b) for a, b in zip(plain, batches(2), strict=True))
    resumed = batches(0, {"shuffle_seed": 42, "epoch": 0, "samples": 16})
    assert all(torch.equal(a, b) for a, b in zip(plain[2:], resumed, strict=True))
