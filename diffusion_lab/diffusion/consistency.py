"""Consistency distillation (Song et al. 2023; Latent Consistency Models, Luo et al. 2023): the math.

A consistency function maps every point of the teacher's probability-flow trajectory to its start:

    f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t),     f(x, 0) = x   (boundary condition)

Distillation (LCM, Algorithm 1) on a coarse grid t_1 < ... < t_N of the teacher's schedule, with
``x = alpha x_0 + sigma eps`` at each grid point:

    x_n       = alpha_n x_0 + sigma_n eps                                         (forward process)
    x_{n-1}   = alpha_{n-1} x0_hat + sigma_{n-1} eps_hat  of the (guided) teacher (skipping-step DDIM solver)
    loss      = d( f_student(x_n, t_n), f_target(x_{n-1}, t_{n-1}) )              (target: EMA or no_grad student)

vp: the grid is LCM's (``t_n = n T/N - 1``, ``t_{n-1} = t_n - T/N`` clamped at 0) and ``c_skip``,
``c_out`` are ``LCMScheduler.get_scalings_for_boundary_condition_discrete`` (timestep_scaling 10),
so the student samples with ``LCMScheduler``.
flow matching: ``x0_hat = x - sigma v`` meets the boundary by itself (``c_skip = 0``, ``c_out = 1``),
the DDIM step is the Euler step ``x + (sigma_{n-1} - sigma_n) v``, and the grid is the scheduler's
(shifted) sigmas at ``n / N``. Sampling the student with the same DDIM step (a first-order
DPM-Solver on flow sigmas, ``conf/sampler/lcm.yaml``) re-noises each ``x0_hat`` with the eps it implies:
deterministic multistep consistency sampling.

Nothing here holds parameters; tensors are ``[N, C, H, W]``, per-sample quantities ``[N]``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F

from diffusion_lab.diffusion.processes import Noised, Process

ConsistencyLoss = Literal["huber", "l2"]


@dataclass
class SolverGrid:
    """The teacher solver's coarse grid: point ``n`` (0 = cleanest, N-1 = noisiest), each ``[N]``:
    ``timestep`` what the network is told, ``alpha``/``sigma`` of ``x = alpha x0 + sigma eps``,
    ``c_skip``/``c_out`` the boundary scalings; ``prev_*`` the same one grid step cleaner."""

    timestep: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor
    prev_timestep: torch.Tensor
    prev_alpha: torch.Tensor
    prev_sigma: torch.Tensor
    prev_c_skip: torch.Tensor
    prev_c_out: torch.Tensor

    def __len__(self) -> int:
        return len(self.timestep)

    def at(self, index: torch.Tensor, device: torch.device | str) -> "SolverGrid":
        """The grid points ``index`` ``[B]`` (one per example), on ``device``."""
        return SolverGrid(**{f.name: getattr(self, f.name)[index.cpu()].to(device) for f in fields(self)})


def vp_grid(scheduler, num_steps: int) -> SolverGrid:
    """LCM's DDIM grid on a vp schedule (``alphas_cumprod`` of ``scheduler``), ``num_steps`` points."""
    from diffusers import LCMScheduler

    T = int(scheduler.config.num_train_timesteps)
    ratio = T // num_steps
    t = (torch.arange(1, num_steps + 1) * ratio).round().long() - 1
    prev = (t - ratio).clamp(min=0)
    a = scheduler.alphas_cumprod.float()
    lcm = LCMScheduler.from_config(scheduler.config)  # its boundary scalings, not a copy of them
    c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t.float())
    prev_c_skip, prev_c_out = lcm.get_scalings_for_boundary_condition_discrete(prev.float())
    return SolverGrid(t, a[t].sqrt(), (1 - a[t]).sqrt(), c_skip, c_out, prev, a[prev].sqrt(), (1 - a[prev]).sqrt(), prev_c_skip, prev_c_out)


def flow_grid(scheduler, num_steps: int) -> SolverGrid:
    """Sigmas ``n / N`` (n = 1..N) through the flow scheduler's own shift (``set_timesteps(sigmas=...)``),
    the network told ``sigma * T``; the cleanest point's ``prev`` is clean data (sigma 0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    mu = {"mu": 0.0} if s.config.use_dynamic_shifting else {}  # shift set per image size at sampling: train unshifted
    s.set_timesteps(sigmas=torch.linspace(1, 0, num_steps + 1)[:-1].tolist(), **mu)
    sigmas = s.sigmas.float().flip(0)  # [0, sigma_1, ..., sigma_N], ascending
    sigma, prev = sigmas[1:], sigmas[:-1]
    T = float(s.config.num_train_timesteps)
    ones, zeros = torch.ones(num_steps), torch.zeros(num_steps)
    return SolverGrid(sigma * T, 1 - sigma, sigma, zeros, ones, prev * T, 1 - prev, prev, zeros, ones)


def solver_grid(process: Process, num_steps: int) -> SolverGrid:
    """The grid for ``process`` (vp or flow_matching)."""
    if process.kind == "vp":
        return vp_grid(process.scheduler, num_steps)
    if process.kind == "flow_matching":
        return flow_grid(process.scheduler, num_steps)
    raise ValueError(f"consistency distillation runs for vp and flow_matching, not {process.kind}")


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like).view(-1, *([1] * (like.ndim - 1)))


def noisy(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``alpha x0 + sigma eps``: a grid point of the forward process, and the DDIM step from
    ``(x0_hat, eps_hat)`` to the next point."""
    return _per_sample(alpha, x0) * x0 + _per_sample(sigma, x0) * eps


def predict_x0(process: Process, output: torch.Tensor, x_t: torch.Tensor, timestep: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x0_hat`` of the network ``output`` at ``x_t``, by the process's own ``predict_x0``."""
    return process.predict_x0(output, Noised(x_t, x_t, timestep, target=x_t, weight=sigma, level=sigma, sigma=sigma))


def implied_eps(x_t: torch.Tensor, x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``eps_hat`` from ``x_t = alpha x0_hat + sigma eps_hat`` (``sigma > 0``)."""
    return (x_t - _per_sample(alpha, x_t) * x0) / _per_sample(sigma, x_t)


def consistency_output(x_t: torch.Tensor, x0: torch.Tensor, c_skip: torch.Tensor, c_out: torch.Tensor) -> torch.Tensor:
    """``f(x_t, t) = c_skip x_t + c_out x0_hat``."""
    return _per_sample(c_skip, x_t) * x_t + _per_sample(c_out, x_t) * x0


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, loss: ConsistencyLoss = "huber", huber_c: float = 0.001) -> torch.Tensor:
    """Mean distance (fp32): pseudo-Huber ``sqrt(d^2 + c^2) - c`` (Song & Dhariwal 2023, as LCM) or L2."""
    pred, target = pred.float(), target.float()
    if loss == "huber":
        return (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c).mean()
    if loss == "l2":
        return F.mse_loss(pred, target)
    raise ValueError(f"consistency loss must be huber or l2; got {loss!r}")
