"""Post-hoc EMA (Karras et al. 2024, section 3): keep power-function EMAs of two widths during
training and snapshot them every N steps; afterwards the EMA of any width (``sigma_rel``) is a
least-squares combination of the snapshots (``diffusion/power_ema.py``), so a sweep over the EMA
length needs no retraining. ``python -m diffusion_lab.posthoc_ema run=<run dir> sigma_rel=0.1``
writes the pipeline of one width.

Snapshot files: ``<dirpath>/sigma_rel_<s>/step_<t>.safetensors``, the trainable parameters by name
(``named_parameters``, without ``torch.compile``'s ``_orig_mod.``), the step, gamma and sigma_rel in
the safetensors metadata (what the reader uses; the file names are for people).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from diffusers.training_utils import EMAModel
from pytorch_lightning.utilities import rank_zero_info
from safetensors import safe_open
from safetensors.torch import save_file

from diffusion_lab.callbacks.ema import (
    EMADevice,
    ema_device,
    ema_parameters,
    ema_step,
    trainable_named_parameters,
)
from diffusion_lab.diffusion.power_ema import (
    beta,
    combine,
    gamma_from_sigma_rel,
    solve_coefficients,
)
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.io import atomic_file


class PowerEMA(EMAModel):
    """diffusers' ``EMAModel`` with the power-function decay beta_t = (1 - 1/t)^(gamma+1)
    (``optimization_step`` is t; ``decay``/warmup settings are not used)."""

    def __init__(self, parameters, gamma: float, foreach: bool = False) -> None:
        super().__init__(parameters, foreach=foreach)
        self.gamma = gamma

    def get_decay(self, optimization_step: int) -> float:
        return beta(optimization_step, self.gamma)


class PostHocEMACallback(pl.Callback):
    """Two (or more) power EMAs of the trainable parameters, snapshotted every ``every_n_steps``
    optimizer steps and when training ends (0 = off: nothing is kept or written).

    Args:
        every_n_steps: snapshot interval (``callbacks.posthoc_ema.every_n_steps``); more snapshots
            fit more widths (the paper keeps ~160 per profile over a run).
        sigma_rels: widths of the profiles kept (the paper: 0.05 and 0.10).
        dirpath: where the snapshots go (``<run dir>/ema_snapshots``).
        device: ``model`` (beside the weights) or ``cpu`` (host memory), as ``callbacks.ema.device``.
        foreach: ``EMAModel``'s multi-tensor update.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 0, sigma_rels: Sequence[float] = (0.05, 0.10), device: EMADevice = "model", foreach: bool = False) -> None:
        if every_n_steps < 0:
            raise ConfigError(f"callbacks.posthoc_ema.every_n_steps={every_n_steps}: use a positive interval, or 0 to switch post-hoc EMA off.")
        self.sigma_rels = [float(s) for s in sigma_rels]
        try:
            self.gammas = [gamma_from_sigma_rel(s) for s in self.sigma_rels]
        except ValueError as e:
            raise ConfigError(f"callbacks.posthoc_ema.sigma_rels={self.sigma_rels}: {e} (the paper keeps 0.05 and 0.10).") from None
        if every_n_steps and len(set(self.sigma_rels)) < 2:
            raise ConfigError(f"callbacks.posthoc_ema.sigma_rels={self.sigma_rels}: keep at least two different widths (e.g. [0.05, 0.10]); one profile cannot be solved for others.")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.device = device
        self.foreach = foreach
        self.emas: list[PowerEMA] = []
        self._pending_state: dict | None = None
        self._last_step = -1
        self._last_saved = -1

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0

    @property
    def state_key(self) -> str:
        return "posthoc_ema"

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.enabled or self.emas:
            return
        params = ema_parameters(pl_module)
        self.emas = [PowerEMA(params, gamma, foreach=self.foreach) for gamma in self.gammas]
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_fit_start(self, trainer, pl_module) -> None:
        for ema in self.emas:
            ema.to(ema_device(self.device, pl_module))

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.enabled:
            return
        steps = self.emas[0].optimization_step
        if steps != trainer.global_step:
            raise ConfigError(
                f"callbacks.posthoc_ema holds {steps} steps of EMA but training resumes at step {trainer.global_step}: the "
                "power EMAs must cover the run from its first step (post-hoc EMA was switched on after the run started, or "
                "the checkpoint lacks its state). Start a new run with callbacks.posthoc_ema.every_n_steps set, or switch it off (=0)."
            )
        self._last_step = trainer.global_step
        self._last_saved = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled or trainer.global_step <= self._last_step:
            return  # off, or no optimizer step yet (gradient accumulation)
        params = ema_parameters(pl_module)
        for ema in self.emas:
            ema_step(ema, params)
        self._last_step = trainer.global_step
        if trainer.global_step % self.every_n_steps == 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.enabled and self._last_step > self._last_saved:
            self.save(trainer, pl_module)  # the last step too: the EMA people want is usually the final one

    def save(self, trainer, pl_module) -> None:
        """One snapshot file per profile at the current step (rank zero; identical on every rank)."""
        self._last_saved = self._last_step
        if not trainer.is_global_zero:
            return
        names = [n for n, _ in trainable_named_parameters(pl_module)]
        for ema, sigma_rel, gamma in zip(self.emas, self.sigma_rels, self.gammas):
            tensors = {n: s.detach().to("cpu", copy=True).contiguous() for n, s in zip(names, ema.shadow_params)}
            meta = {"step": str(ema.optimization_step), "gamma": repr(gamma), "sigma_rel": repr(sigma_rel)}
            path = self.dirpath / f"sigma_rel_{sigma_rel:.3f}" / f"step_{ema.optimization_step:07d}.safetensors"
            with atomic_file(path) as tmp:
                save_file(tensors, tmp, metadata=meta)
        rank_zero_info(f"post-hoc EMA snapshots at step {self._last_step} -> {self.dirpath}")

    def state_dict(self) -> dict:
        return {"emas": [ema.state_dict() for ema in self.emas]} if self.emas else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if not self.emas:  # restored before setup(): apply once the EMAs exist
            self._pending_state = state_dict
            return
        if len(state_dict["emas"]) != len(self.emas):
            raise ConfigError(f"the checkpoint holds {len(state_dict['emas'])} post-hoc EMA profiles, callbacks.posthoc_ema.sigma_rels has {len(self.emas)}: resume with the run's sigma_rels.")
        for ema, state in zip(self.emas, state_dict["emas"]):
            ema.load_state_dict(state)


# ---- reading the snapshots back ------------------------------------------------------------------
@dataclass
class Snapshot:
    """One snapshot file: the EMA of profile ``gamma`` at ``step``."""

    path: Path
    step: int
    gamma: float
    sigma_rel: float

    def tensors(self) -> dict[str, torch.Tensor]:
        with safe_open(str(self.path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}


def find_snapshots(dirpath: str | Path) -> list[Snapshot]:
    """Every snapshot under ``dirpath``, ordered by (sigma_rel, step)."""
    found = []
    for path in sorted(Path(dirpath).glob("sigma_rel_*/step_*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if {"step", "gamma", "sigma_rel"} <= meta.keys():
            found.append(Snapshot(path, int(meta["step"]), float(meta["gamma"]), float(meta["sigma_rel"])))
    return sorted(found, key=lambda s: (s.sigma_rel, s.step))


def reconstruct(snapshots: list[Snapshot], sigma_rel: float, step: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(the EMA of width ``sigma_rel`` at ``step`` as ``{name: tensor}``, a report: coefficients,
    relative residual of the profile fit, the snapshots used). ``step`` None = the last snapshot's,
    else within the snapshots' steps; snapshots after ``step`` are not used."""
    if not snapshots:
        raise ConfigError("no post-hoc EMA snapshots found: train with callbacks.posthoc_ema.every_n_steps=N (N > 0) first.")
    last = max(s.step for s in snapshots)
    step = last if step is None else int(step)
    used = [s for s in snapshots if s.step <= step]
    if not used or step > last:
        where = "before the first" if not used else "after the last"
        raise ConfigError(
            f"step={step} is {where} post-hoc EMA snapshot (the snapshots cover steps {min(s.step for s in snapshots)} to "
            f"{last}): pick a step in that range, or leave step unset (null) for the last."
        )
    try:
        gamma_r = gamma_from_sigma_rel(sigma_rel)
    except ValueError as e:
        raise ConfigError(f"sigma_rel={sigma_rel}: {e}.") from None
    x, residual = solve_coefficients(torch.tensor([s.step for s in used]), torch.tensor([s.gamma for s in used]), step, gamma_r)
    weights = combine([s.tensors() for s in used], x)
    report = {
        "sigma_rel": sigma_rel, "gamma": gamma_r, "step": step, "residual": residual,
        "snapshots": [{"file": str(s.path), "step": s.step, "sigma_rel": s.sigma_rel, "coefficient": float(c)} for s, c in zip(used, x)],
    }
    return weights, report


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (from ``reconstruct``) into ``module``'s trainable parameters by name."""
    params = dict(trainable_named_parameters(module))
    missing, extra = sorted(params.keys() - weights.keys()), sorted(weights.keys() - params.keys())
    if missing or extra:
        raise ConfigError(
            f"the post-hoc EMA snapshots do not match the run's trainable parameters (missing {missing[:3]}, unexpected "
            f"{extra[:3]}): use the snapshots and checkpoint of the same run."
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
