"""The first stage of a latent diffusion model: images <-> scaled VAE latents.

    z = (E(x) - shift_factor) * scaling_factor          x = D(z / scaling_factor + shift_factor)

``scaling_factor`` (0.18215 for SD 1.x/2.x, 0.13025 for SDXL) and ``shift_factor`` (SD3/Flux)
are read from the VAE's own config; they are written nowhere else (Rombach et al. 2022, sec. 4.3.2).
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from diffusion_lab.components.pretrained import Dtype, torch_dtype
from diffusion_lab.components.shapes import downsample_factor


class VAECodec(torch.nn.Module):
    """A frozen ``AutoencoderKL`` (no grads, always in eval mode, optionally held in bf16/fp16).

    Args:
        vae: the autoencoder (built by Hydra: from ``model.pretrained`` or its own config).
        sample_posterior: train on a sample of q(z|x) (as SD was trained) or on its mean.
        dtype: dtype the VAE is held in. The SD VAE overflows in float16 (NaN / black images);
            keep float32 or bfloat16 unless you use an fp16-fixed VAE.
    """

    def __init__(self, vae: torch.nn.Module, sample_posterior: bool = True, dtype: Dtype = "float32") -> None:
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        if self.vae.dtype != torch_dtype(dtype):
            self.vae.to(torch_dtype(dtype))
        self.sample_posterior = sample_posterior

    def train(self, mode: bool = True) -> VAECodec:
        return super().train(False)  # frozen: Lightning's model.train() must not switch it

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(self.vae.config.get("shift_factor", None) or 0.0)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side: 2 per down block after the first (8 for SD)."""
        return downsample_factor(self.vae.config.block_out_channels)

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` in [-1, 1] -> posterior parameters (mean, logvar) ``[N, 2c, h, w]``
        (fp32). Cacheable: ``latents`` draws the posterior sample from them."""
        # contiguous: CPU convs may return channels_last, and randn_like would then draw differently
        # the VAE may sit on another device than the images (model.offload_frozen): the moments come back to theirs
        moments = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist.parameters
        return moments.to(images.device, torch.float32).contiguous()

    def latents(self, moments: torch.Tensor, sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Posterior parameters ``[N, 2c, h, w]`` -> diffusion-space latents ``[N, c, h, w]``."""
        dist = DiagonalGaussianDistribution(moments)
        z = dist.sample(generator) if sample else dist.mode()
        return (z - self.shift_factor) * self.scaling_factor

    def encode(self, images: torch.Tensor, sample: bool | None = None) -> torch.Tensor:
        """Images ``[N, C, H, W]`` in [-1, 1] -> latents ``[N, c, H/f, W/f]``."""
        return self.latents(self.moments(images), self.sample_posterior if sample is None else sample)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[N, c, h, w]`` -> images ``[N, C, h*f, w*f]`` (roughly [-1, 1], fp32)."""
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.device, self.vae.dtype)).sample.to(latents.device, torch.float32)


class IdentityCodec(torch.nn.Module):
    """Pixel space as a latent space (``vae=identity``): the diffused tensor is the image itself,
    so a pixel model is a latent model whose first stage does nothing (as sgm's identity first stage).

    Args:
        channels: image channels (``data.channels``), which are also the "latent" channels.
    """

    sample_posterior = False
    downsample_factor = 1
    frozen = True

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.latent_channels = self.image_channels = int(channels)

    def moments(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def latents(self, moments: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        return moments

    def encode(self, images: torch.Tensor, sample: bool | None = None) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents
