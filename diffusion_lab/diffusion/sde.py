"""Stochastic sampling steps with a known Gaussian transition, and the GRPO objective on them.

Online RL on a diffusion / flow model (DDPO, Black et al. 2023; Flow-GRPO, Liu et al. 2025) treats
each denoising step as a policy ``pi_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), std_t^2 I)``, so the
log-probability of a recorded trajectory is a sum of Gaussian terms. Nothing here holds parameters;
tensors are ``[N, C, H, W]``, per-sample quantities ``[N]``.

    vp (DDIM with eta > 0, Song et al. 2021, eq. 12/16):
        std_t = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
        (the mean is diffusers' DDIMScheduler.step with zero variance noise)
    flow matching (Flow-GRPO, eq. 8: the ODE dx = v dsigma turned into an SDE with the same marginals):
        sigma_t = a * sqrt(sigma / (1 - sigma))                  (a = noise level)
        mean    = x + [v + sigma_t^2 / (2 sigma) (x + (1 - sigma) v)] dsigma,  dsigma = sigma_next - sigma < 0
        std     = sigma_t * sqrt(-dsigma)
    GRPO (Shao et al. 2024; Flow-GRPO eq. 5-7):
        A_i   = (r_i - mean(r_group)) / (std(r_group) + eps)
        L     = mean max(-A ratio, -A clip(ratio, 1 - c, 1 + c)) + beta KL(pi_theta || pi_ref),
        ratio = exp(log pi_theta - log pi_old);  KL of two Gaussians of one std = |mu - mu_ref|^2 / (2 std^2)

Log-probabilities and KLs are averaged over the pixels (as Flow-GRPO does), so their scale does
not grow with resolution.
"""

from __future__ import annotations

import math

import torch


def _per_sample(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.view(-1, *([1] * (like.ndim - 1))) if value.ndim else value


def _mean_over_pixels(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """``log N(x; mean, std^2)`` per element, averaged over the pixels: ``[N]``. ``std`` a scalar
    or ``[N]``."""
    std = _per_sample(std, x)
    elementwise = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return _mean_over_pixels(elementwise.expand_as(x))


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """``KL(N(mean, std^2) || N(ref_mean, std^2))`` per element, averaged over the pixels: ``[N]``."""
    return _mean_over_pixels((mean - ref_mean) ** 2 / (2 * _per_sample(std, mean) ** 2))


def flow_sde_step(
    x: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float, noise_level: float, sigma_max: float | None = None
) -> tuple[torch.Tensor, float]:
    """(mean ``[N, C, H, W]``, std) of Flow-GRPO's SDE step from ``sigma`` to ``sigma_next`` < sigma.

    ``sigma_max`` stands in for ``sigma`` in ``sigma_t`` where ``sigma == 1`` (sigma_t is infinite
    there; Flow-GRPO uses the schedule's second sigma). ``noise_level`` = 0 is the Euler ODE step."""
    dt = sigma_next - sigma
    s = sigma_max if (sigma >= 1.0 and sigma_max is not None) else sigma
    sigma_t = noise_level * math.sqrt(s / (1 - s)) if s < 1 else 0.0
    mean = x * (1 + sigma_t**2 / (2 * sigma) * dt) + velocity * (1 + sigma_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, sigma_t * math.sqrt(-dt)


def ddim_step_std(alpha_prod_t: float, alpha_prod_prev: float, eta: float) -> float:
    """DDIM's transition std for ``eta`` (eq. 16): 0 = deterministic DDIM, 1 = DDPM's posterior std."""
    return eta * math.sqrt((1 - alpha_prod_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_prev))


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """``[N]`` rewards of ``N / group_size`` consecutive groups -> group-normalised advantages ``[N]``
    (population std within each group)."""
    if rewards.ndim != 1 or len(rewards) % group_size:
        raise ValueError(f"rewards must be [N] with N a multiple of group_size={group_size}; got shape {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)).flatten()


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per sample ``[N]`` (to minimise), and which samples were clipped ``[N]`` (float)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), ((ratio - 1).abs() > clip_range).float()
