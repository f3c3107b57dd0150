"""The diffusion math every model in diffusion_lab uses, and nothing else.

Notation (Ho et al. 2020; Salimans & Ho 2022 for v): with ``a_t = alphas_cumprod[t]``

    x_t = sqrt(a_t) * x_0 + sqrt(1 - a_t) * eps              (scheduler.add_noise)
    v_t = sqrt(a_t) * eps - sqrt(1 - a_t) * x_0              (scheduler.get_velocity)
    SNR(t) = a_t / (1 - a_t)                                 (training_utils.compute_snr)

All quantities come from a diffusers scheduler (``alphas_cumprod``, ``add_noise``,
``get_velocity``); nothing here holds parameters. Tensors are ``[N, C, H, W]``, timesteps ``[N]``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

PredictionType = Literal["epsilon", "v_prediction", "sample"]
LossWeighting = Literal["none", "min_snr"]


def sample_timesteps(n: int, num_train_timesteps: int, device: torch.device | str = "cpu", generator=None) -> torch.Tensor:
    """Uniform t ~ U{0, ..., T-1}, shape ``[n]`` (long)."""
    return torch.randint(0, num_train_timesteps, (n,), device=device, generator=generator, dtype=torch.long)


def add_offset_noise(noise: torch.Tensor, strength: float, generator=None) -> torch.Tensor:
    """Offset noise (Guttenberg 2023): add a per-(sample, channel) constant so the model can learn
    to change the mean brightness. ``strength=0`` returns ``noise`` unchanged. Returns a new tensor."""
    if strength == 0:
        return noise
    offset = torch.randn(noise.shape[:2] + (1,) * (noise.ndim - 2), device=noise.device, dtype=noise.dtype, generator=generator)
    return noise + strength * offset


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: PredictionType) -> torch.Tensor:
    """What the network is trained to output for ``x_t = add_noise(x0, noise, t)``."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type must be one of epsilon, v_prediction, sample; got {prediction_type!r}")


def _alpha_sigma(scheduler, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(a_t), sqrt(1 - a_t) broadcast to ``like``'s shape."""
    a = scheduler.alphas_cumprod.to(device=like.device, dtype=torch.float32)[timesteps.to(like.device)]
    a = a.view(-1, *([1] * (like.ndim - 1)))
    return a.sqrt().to(like.dtype), (1 - a).sqrt().to(like.dtype)


def predict_x0(scheduler, model_output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor, prediction_type: PredictionType) -> torch.Tensor:
    """x_0 implied by the network output (eq. 15 of Ho et al. for eps; Salimans & Ho for v)."""
    alpha, sigma = _alpha_sigma(scheduler, timesteps, x_t)
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type must be one of epsilon, v_prediction, sample; got {prediction_type!r}")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = a_t / (1 - a_t), shape ``[N]`` (diffusers' ``compute_snr``)."""
    return compute_snr(scheduler, timesteps)


def loss_weights(scheduler, timesteps: torch.Tensor, weighting: LossWeighting, prediction_type: PredictionType, snr_gamma: float = 5.0) -> torch.Tensor:
    """Per-sample loss weights ``[N]``.

    ``min_snr`` is Min-SNR-gamma (Hang et al. 2023), expressed for the chosen target: the paper's
    x0-space weight min(SNR, gamma) becomes min(SNR, gamma)/SNR for an epsilon target and
    min(SNR, gamma)/(SNR + 1) for a v target, because ||eps error||^2 = SNR * ||x0 error||^2 and
    ||v error||^2 = (SNR + 1) * ||x0 error||^2.
    """
    if weighting == "none":
        return torch.ones(timesteps.shape[0], device=timesteps.device)
    if weighting != "min_snr":
        raise ValueError(f"loss weighting must be 'none' or 'min_snr'; got {weighting!r}")
    s = snr(scheduler, timesteps).float()
    clipped = torch.clamp(s, max=snr_gamma)
    if prediction_type == "epsilon":
        return clipped / s
    if prediction_type == "v_prediction":
        return clipped / (s + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"prediction_type must be one of epsilon, v_prediction, sample; got {prediction_type!r}")


def downsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """A pixel loss mask ``[N, 1, H, W]`` -> ``[N, 1, H/f, W/f]`` for latents of a codec with
    down-sampling ``factor`` (``codec.downsample_factor``): the mean over each f x f patch (area
    pooling), so a latent counts as much as the pixels it covers. ``factor=1`` returns ``mask``."""
    if factor == 1:
        return mask
    if mask.shape[-2] % factor or mask.shape[-1] % factor:
        raise ValueError(f"a loss mask of {tuple(mask.shape[-2:])} pixels does not divide by the codec's factor {factor}")
    return F.avg_pool2d(mask.float(), factor)


def per_sample_loss(model_output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted MSE per sample ``[N]``: mean over pixels, times ``weights[N]`` (fp32).

    ``mask`` ``[N, 1, H, W]`` in [0, 1] (the target's spatial size; ``downsample_mask`` for latents)
    weights each pixel (all channels): the loss is then the mask-weighted mean, sum(m * e) / sum(m)
    over the image, so an image counts as much whatever its mask's area (an all-ones mask gives
    exactly the plain mean; an all-zeros mask gives 0)."""
    error = F.mse_loss(model_output.float(), target.float(), reduction="none")
    if mask is None:
        per_sample = error.flatten(1).mean(1)
    else:
        if mask.shape[0] != error.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != error.shape[2:]:
            raise ValueError(f"loss mask of shape {tuple(mask.shape)} does not fit the target {tuple(error.shape)}: it must be [N, 1, H, W]")
        mask = mask.to(error)
        coverage = mask.flatten(1).mean(1)  # all ones: exactly 1.0
        per_sample = (error * mask).flatten(1).mean(1) / coverage.clamp_min(torch.finfo(error.dtype).tiny)
    return per_sample if weights is None else per_sample * weights.to(per_sample)


def diffusion_loss(model_output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted MSE: mean over pixels per sample, times ``weights[N]``, mean over the batch (fp32)."""
    return per_sample_loss(model_output, target, weights).mean()
