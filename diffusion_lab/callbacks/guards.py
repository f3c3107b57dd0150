"""Callbacks that keep long runs safe: exact RNG resume, stop on nan/inf, checkpoint on SIGTERM/Ctrl-C,
``last.ckpt`` at the end of training, a fresh ``trainer.max_time`` budget after a resume."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from diffusion_lab.compat.lightning import collect_rng_states, set_rng_states
from diffusion_lab.utils.errors import TrainingError


def last_checkpoint_path(trainer: pl.Trainer) -> Path:
    """``<ModelCheckpoint dirpath>/last.ckpt`` (or ``<default_root_dir>/checkpoints/last.ckpt``)."""
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


class FinalModelCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that also writes ``last.ckpt`` when training ends for any
    reason (``max_steps`` off the ``every_n_train_steps`` grid, ``trainer.max_time``, early stop),
    so ``last.ckpt`` is never older than the exported pipeline and the last sample grid.
    Lightning's own only does so when it never saved at all. With ``enable_version_counter=false``
    (conf/callbacks/default.yaml) a run started in a folder that already holds a ``last.ckpt``
    overwrites it instead of adding ``last-v1.ckpt``."""

    @property
    def state_key(self) -> str:  # Lightning's name: checkpoints of either class resume with the other
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__) :]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


class FreshTimeBudget(pl.Callback):
    """``trainer.max_time`` counts per launch: a run resumed from a checkpoint of a time-limited
    run gets the whole budget again. (Lightning's ``Timer`` stores the time already spent in the
    checkpoint and, put back, stops the resumed run at once: "Time limit reached".) The stored
    time is dropped from the checkpoint before the callbacks' states are loaded."""

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get("callbacks", {})
        for key in [k for k in states if str(k).startswith("Timer")]:
            del states[key]


class RNGStateCallback(pl.Callback):
    """Stores every rank's global torch / CUDA / NumPy / Python RNG state in each checkpoint and
    puts them back right before the first training step after a resume, so the resumed run draws
    the same noise and timesteps as an unbroken one. (Lightning restores step, optimizer, LR
    schedule and callback state, but not RNG.)"""

    def __init__(self) -> None:
        self._pending: list[dict] | None = None
        self._rank = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._rank = trainer.global_rank

    def state_dict(self) -> dict:
        state = collect_rng_states(include_cuda=torch.cuda.is_available())
        # NumPy's key array as a tensor: Lightning resumes with torch.load(weights_only=True)
        name, keys, pos, has_gauss, gauss = state["numpy"]
        state["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return {"ranks": [state]}
        states: list = [None] * dist.get_world_size()
        dist.all_gather_object(states, state)  # checkpoints are dumped on every rank, written by rank 0
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict.get("ranks") or None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        # not at load time: restoring, sanity checks and building loaders happen in between
        if self._pending is not None:
            if len(self._pending) != trainer.world_size:
                rank_zero_warn(f"checkpoint has RNG states of {len(self._pending)} processes, this run has {trainer.world_size}: not restoring them (the run continues, but not bit-exactly)")
            else:
                state = dict(self._pending[self._rank])
                name, keys, pos, has_gauss, gauss = state["numpy"]
                state["numpy"] = (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
                set_rng_states(state)
            self._pending = None


class NonFiniteGuard(pl.Callback):
    """Stops the run when the training loss (or, without a loss scaler, a gradient) is nan/inf,
    *before* the optimizer step, so neither the weights nor any checkpoint get the bad values.

    One check per step, so one device sync (and under DDP one all-reduce): the total gradient norm
    is finite iff every gradient is, and a nan/inf loss makes the gradients nan. With ``16-mixed``
    precision overflowing gradients are the loss scaler's business (it skips the step and lowers
    the scale, and training goes on), so there the loss itself is checked.
    """

    def __init__(self) -> None:
        self._loss: torch.Tensor | None = None

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._loss = loss.detach()  # no sync here: read only when a check fails or with a scaler
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            self._check(trainer, not bool(torch.isfinite(self._loss).all()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # one fused foreach norm over all gradients
        self._check(trainer, bool(grads) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))))

    def _check(self, trainer, bad: bool) -> None:
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            loss = self._loss
            if loss is not None and not bool(torch.isfinite(loss).all()):
                self._stop(trainer, f"the training loss is {loss.float().item()}")
            self._stop(trainer, "a gradient is nan/inf" if bad else "a gradient or the loss is nan/inf on another process")

    @staticmethod
    def _stop(trainer, what: str) -> None:
        step = trainer.global_step + 1
        last = last_checkpoint_path(trainer)
        kept = f"The last good checkpoint is {last}; resume from it with ckpt_path={last}." if last.is_file() else "No checkpoint was written before it."
        raise TrainingError(
            f"{what} at step {step} (epoch {trainer.current_epoch}); training stopped before this step's "
            f"update, so the weights stay finite. {kept} Usual fixes: lower model.optimizer.lr, keep "
            f"trainer.gradient_clip_val set, use trainer.precision=bf16-mixed or 32-true instead of "
            f"16-mixed, more lr warmup (model.lr_scheduler.num_warmup_steps), or check the data for nan."
        )


class SignalStop(SystemExit):
    """Raised to end ``fit`` after a signal; its code is 128 + the signal number."""


class SignalCheckpoint(Checkpoint):
    """On SIGTERM (preemption, ``kill``, SLURM) or Ctrl-C: finish the current step, write
    ``last.ckpt`` (where ``ModelCheckpoint`` writes it), and stop with exit code 128 + signal.
    A second Ctrl-C aborts at once. A ``Checkpoint`` subclass so Lightning runs it after every
    other callback (the saved EMA includes the step)."""

    def __init__(self) -> None:
        self._signal: int | None = None
        self._saved = False
        self._previous_sigint = None

    def on_train_start(self, trainer, pl_module) -> None:
        # not on_fit_start: Lightning snapshots the signal handlers after it and puts them back at teardown
        self._signal, self._saved = None, False
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame) -> None:
        if self._signal is not None:  # second Ctrl-C: the user means it
            signal.signal(signal.SIGINT, self._previous_sigint or signal.default_int_handler)
            raise KeyboardInterrupt
        self._signal = signum
        print("\nCtrl-C: finishing this step and saving a checkpoint (press again to abort)", file=sys.stderr)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        signum = self._signal or (signal.SIGTERM if trainer.received_sigterm else None)
        # every rank must agree, or the collective save below would hang
        if trainer.strategy.reduce_boolean_decision(signum is not None, all=False):
            signum = signum or signal.SIGTERM
            self._save(trainer, signum)
            raise SignalStop(128 + signum)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # under DDP Lightning itself raises SIGTERMException on every rank between two steps
        if isinstance(exception, SIGTERMException) and not self._saved:
            self._save(trainer, signal.SIGTERM)
        self._restore_sigint()

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_sigint()

    def _save(self, trainer, signum: int) -> None:
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(str(path))
        self._saved = True
        self._report(signal.Signals(signum).name, trainer.global_step, path)

    @staticmethod
    @rank_zero_only
    def _report(name: str, step: int, path: Path) -> None:
        print(f"\n{name}: saved {path} at step {step}; resume with ckpt_path={path}", file=sys.stderr)
