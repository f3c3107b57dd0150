"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023; Esser et al. 2024, SD3).

Notation: ``sigma`` in [0, 1] is the noise level, ``x_0`` data, ``eps`` standard normal noise:

    x_sigma = (1 - sigma) * x_0 + sigma * eps              (FlowMatchEulerDiscreteScheduler.scale_noise)
    target  = eps - x_0                                     (the velocity d x_sigma / d sigma)
    x_0     = x_sigma - sigma * v                           (FlowMatchEulerDiscreteScheduler.step)

The network is told ``timestep = sigma * num_train_timesteps`` (the scheduler's ``timesteps``),
as SD3 and Flux are. Timestep densities and loss weights are diffusers' own
(``compute_density_for_timestep_sampling``, ``compute_loss_weighting_for_sd3``); the resolution
shift is the scheduler's ``shift`` (its sigma table). Nothing here holds parameters; tensors are
``[N, C, H, W]``, ``sigma`` is ``[N]``.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

TimestepDensity = Literal["uniform", "logit_normal", "mode"]
FlowLossWeighting = Literal["none", "sigma_sqrt", "cosmap"]


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.to(like).view(-1, *([1] * (like.ndim - 1)))


def sample_sigmas(
    scheduler,
    n: int,
    density: TimestepDensity = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas ``[n]``, timesteps ``[n]``) from the scheduler's (shifted) tables, at positions
    ``u ~ density`` as diffusers' SD3 / Flux training scripts draw them."""
    u = compute_density_for_timestep_sampling(density, n, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale, generator=generator)
    T = scheduler.config.num_train_timesteps
    idx = (u * T).long().clamp(0, T - 1)
    return scheduler.sigmas[idx].float(), scheduler.timesteps[idx].float()


def noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) x_0 + sigma eps``."""
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * noise


def target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity ``eps - x_0`` the network is trained to output."""
    return noise - x0


def predict_x0(model_output: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_0 = x_sigma - sigma * v``."""
    return x_t - _per_sample(sigma, x_t) * model_output


def loss_weights(weighting: FlowLossWeighting, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample weights ``[N]``: none, sigma_sqrt (``sigma^-2``) or cosmap (SD3 paper, section 3.1)."""
    if weighting not in ("none", "sigma_sqrt", "cosmap"):
        raise ValueError(f"flow loss weighting must be none, sigma_sqrt or cosmap; got {weighting!r}")
    return compute_loss_weighting_for_sd3(weighting, sigma.float())
