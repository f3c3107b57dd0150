"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

    x_sigma = x_0 + sigma * eps                                    (Table 1: s(t) = 1, sigma(t) = t)
    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))     (eq. 7)
    c_skip = sigma_d^2 / (sigma^2 + sigma_d^2),  c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2)
    c_in = 1 / sqrt(sigma^2 + sigma_d^2),        c_noise = ln(sigma) / 4
    ln sigma ~ N(P_mean, P_std^2),  lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2

The preconditioning is the scheduler's own (``EDMEulerScheduler.precondition_inputs /
precondition_noise / precondition_outputs``), so training and sampling share one definition;
this module adds the sigma density and the loss weight, which diffusers does not ship.
Tensors are ``[N, C, H, W]``, ``sigma`` is ``[N]``.
"""

from __future__ import annotations

import torch


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.to(like).view(-1, *([1] * (like.ndim - 1)))


def sample_sigmas(n: int, p_mean: float = -1.2, p_std: float = 1.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """``sigma = exp(P_mean + P_std * z)``, ``z ~ N(0, 1)``, shape ``[n]`` (EDM Table 1, training)."""
    return (p_mean + p_std * torch.randn(n, generator=generator)).exp()


def noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_0 + sigma * eps``."""
    return x0 + _per_sample(sigma, x0) * noise


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """``lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2``, shape ``[N]``: with it the
    loss on ``D`` equals an unweighted loss on ``F``'s effective target (EDM eq. 8)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def model_inputs(scheduler, x_t: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``c_in * x``, ``c_noise``): what the network ``F`` is given."""
    return scheduler.precondition_inputs(x_t, _per_sample(sigma, x_t)), scheduler.precondition_noise(sigma)


def denoised(scheduler, x_t: torch.Tensor, model_output: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``D = c_skip x + c_out F`` (the scheduler's ``precondition_outputs``)."""
    return scheduler.precondition_outputs(x_t, model_output, _per_sample(sigma, x_t))
