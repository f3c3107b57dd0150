"""Helpers for tests that start real processes: the training CLI as a subprocess, and a callback
(``RankProbe``) that makes every DDP rank save what the tests compare across ranks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from torch.distributed.tensor import DTensor

from diffusion_lab.callbacks.ema import EMACallback
from diffusion_lab.components.fsdp import whole

REPO = Path(__file__).resolve().parents[1]
PROBE = ["+callbacks.probe._target_=tests.multiproc.RankProbe", "+callbacks.probe.dirpath=${paths.output_dir}/probe"]

# The curve runs that 1 process, 2-process DDP and 2-process FSDP are compared on (tests/test_ddp.py,
# test_fsdp.py): one optimizer step = the same 16 images in every set-up (1 x 16 or 2 x 8); constant LR
STEPS = 30
CURVE = [
    "data.batch_size=16",
    "model.lr_scheduler=null",
    "model.optimizer.lr=2e-3",
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=10",
    "callbacks.model_checkpoint.every_n_train_steps=10",
    "callbacks.sample_grid.every_n_steps=10",
]
# val/loss (fixed noise per batch, reduced over ranks) of 2 x 8 stays within this relative band of
# 1 x 16 at every check; measured: <= 10 % while the loss falls from ~1.0 to ~0.12
CURVE_RTOL = 0.2


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny(*overrides: str) -> list[str]:
    """conftest's TINY overrides followed by ``overrides``; a key given twice keeps its last value
    (Hydra refuses a key twice on one command line)."""
    from tests.conftest import TINY

    merged = {o.split("=", 1)[0]: o for o in [*TINY, *overrides]}
    return list(merged.values())


def _cli(args: list[str], log_dir: Path) -> tuple[list[str], dict]:
    """Command and environment of ``python -m diffusion_lab.train <args>``: outputs under ``log_dir``, offline."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return [sys.executable, "-m", "diffusion_lab.train", *args, f"paths.log_dir={log_dir}"], env


def run_cli(args: list[str], log_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m diffusion_lab.train <args>`` with outputs under ``log_dir``, offline, no network."""
    cmd, env = _cli(args, log_dir)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    (log_dir / "cli.log").parent.mkdir(parents=True, exist_ok=True)
    (log_dir / "cli.log").write_text(proc.stdout + proc.stderr)  # kept in tmp_path for debugging
    return proc


def start_cli(args: list[str], log_dir: Path, log: Path) -> subprocess.Popen:
    """``run_cli`` without waiting: the process, its output going to ``log``."""
    cmd, env = _cli(args, log_dir)
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def kill_all_ranks_after_step(args: list[str], step: int, log_dir: Path, timeout: float = 600) -> None:
    """``python -m diffusion_lab.train <args>`` in a session of its own, held after optimizer step
    ``step`` (``tests.test_reliability.PauseAtStep``), then SIGKILLed with every rank it launched,
    as when a node is lost."""
    marker = log_dir / f"paused_at_{step}"
    pause = f"+callbacks.pause={{_target_: tests.test_reliability.PauseAtStep, step: {step}, marker: '{marker}'}}"
    cmd, env = _cli([*args, pause], log_dir)
    with open(log_dir / "killed.log", "w") as log:
        child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), (log_dir / "killed.log").read_text()[-3000:]
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()


class RankProbe(pl.Callback):
    """At the end of fit, every rank saves ``<dirpath>/rank<k>.pt``: weights, EMA, reduced
    ``val/loss``, its sampler and the first noise values it drew."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.first_noise: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_noise is None:  # what torch.randn_like in the training step draws next
            state = torch.get_rng_state()
            self.first_noise = torch.randn(4)
            torch.set_rng_state(state)

    def on_train_end(self, trainer, pl_module) -> None:
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMACallback))
        sampler = trainer.train_dataloader.sampler
        # trainer=fsdp: whole tensors gathered from the shards (every rank calls on_train_end), and
        # how many elements of each sharded parameter this rank holds
        params = dict(pl_module.base_backbone.named_parameters())
        out = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "unet": {k: whole(v.detach()).cpu().clone() for k, v in pl_module.base_backbone.state_dict().items()},
            "local_numel": {k: (p.to_local().numel() if isinstance(p, DTensor) else p.numel()) for k, p in params.items()},
            "numel": {k: p.numel() for k, p in params.items()},
            "trainable": sorted(k for k, p in params.items() if p.requires_grad),
            "ema_is_sharded": [isinstance(p, DTensor) for p in ema.ema.shadow_params],
            "ema": [whole(p.detach()).cpu().clone() for p in ema.ema.shadow_params],
            "val_loss": float(trainer.callback_metrics["val/loss"]),
            "sampler_is_distributed": isinstance(sampler, torch.utils.data.DistributedSampler),
            "sampler_seed": getattr(sampler, "seed", None),
            # an IterableDataset's loader (data=shards) has an endless placeholder sampler
            "sampler_order": list(iter(sampler)) if isinstance(sampler, torch.utils.data.DistributedSampler) else None,
            "first_noise": self.first_noise,
        }
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(out, self.dirpath / f"rank{trainer.global_rank}.pt")


def load_probes(run_dir: Path) -> list[dict]:
    return [torch.load(p, weights_only=False) for p in sorted((run_dir / "probe").glob("rank*.pt"))]


class CrashOnRank(pl.Callback):
    """Raises in one DDP rank at the start of training step ``step`` (a GPU running out of memory,
    a bad batch in one shard); the other ranks are left waiting in the next collective.
    ``rank=-1`` never crashes (so a sweep over ``rank`` can crash one job only)."""

    def __init__(self, rank: int = 1, step: int = 0) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash of rank {self.rank} at step {self.step}")
