"""FLUX.1 (Black Forest Labs 2024): rectified flow with an MMDiT (``FluxTransformer2DModel``: double-
then single-stream blocks, RoPE over 3-axis position ids) on 16-channel VAE latents whose 2x2 patches
are packed into 64-channel tokens. Conditioned on T5 states and CLIP's pooled embedding; FLUX.1-dev
is guidance-distilled: the guidance scale is an input the transformer embeds (``guidance``), not
classifier-free guidance. ``LatentDiffusion3`` with packing, ids and guidance; the export is a
``FluxPipeline``. Trains as diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py`` does."""

from __future__ import annotations

import numpy as np
import torch

from diffusion_lab.modules.diffusion_module import batch_len
from diffusion_lab.modules.sd3 import LatentDiffusion3, filter_set_timesteps


class LatentFlux(LatentDiffusion3):
    """``FluxTransformer2DModel`` on packed VAE latents.

    The shared sampler and process see unpacked latents ``[N, 16, h, w]`` (Euler steps are
    element-wise, so packing commutes with them); ``denoise`` packs them into tokens ``[N, hw/4, 64]``
    with ``FluxPipeline._pack_latents``, builds the image ids (row, column per token) and the text
    ids (zeros), and unpacks the output. Timesteps are sigma (the pipeline's ``t / 1000``).

    Args:
        guidance: the distilled guidance the transformer embeds while training (diffusers' Flux scripts:
            3.5); ignored by a transformer without ``guidance_embeds`` (schnell).
        sample_guidance: the guidance of previews when none is given (``FluxPipeline``'s ``guidance_scale``
            default, 3.5). Previews never run classifier-free guidance, as ``FluxPipeline`` does not by default.
        **kwargs: as ``LatentDiffusion3``.
    """

    family = "latent_flux"
    packing = 2

    def __init__(self, unet: torch.nn.Module, process, sampler, optimizer, codec, conditioner, guidance: float = 3.5, sample_guidance: float = 3.5, **kwargs) -> None:
        super().__init__(unet, process, sampler, optimizer, codec, conditioner, **kwargs)

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.base_unet.config.guidance_embeds)

    def _guidance(self, value: float, n: int) -> dict[str, torch.Tensor]:
        """``{"guidance": [n]}`` for a guidance-distilled transformer, else nothing."""
        return {"guidance": torch.full((n,), float(value), device=self.device)} if self.guidance_embeds else {}

    def conditioning(self, batch: dict, train: bool) -> dict[str, torch.Tensor]:
        return {**super().conditioning(batch, train), **self._guidance(self.hparams.guidance, batch_len(batch))}

    def sampling_conditioning(self, cond_batch: dict | None, n: int):
        """Prompts as ``LatentDiffusion``; no unconditional half (FluxPipeline samples without CFG);
        ``cond_batch["guidance"]`` (set by ``generate``) is the embedded guidance."""
        cond, _ = super().sampling_conditioning(cond_batch, n)
        guidance = (cond_batch or {}).get("guidance", self.hparams.sample_guidance)
        return {**cond, **self._guidance(guidance, n)}, None

    @torch.no_grad()
    def generate(self, n: int, *args, cond_batch: dict | None = None, guidance_scale: float | None = None, **kwargs) -> torch.Tensor:
        """As ``DiffusionModule.generate``; ``guidance_scale`` is FluxPipeline's: the embedded guidance
        (None: ``sample_guidance``), never classifier-free guidance."""
        guidance = self.hparams.sample_guidance if guidance_scale is None else guidance_scale
        return super().generate(n, *args, cond_batch={**(cond_batch or {}), "guidance": guidance}, guidance_scale=1.0, **kwargs)

    # ---- the transformer on packed tokens -----------------------------------------------------
    def denoise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[N, c, h, w]`` at timesteps ``t`` = sigma x 1000 -> velocity ``[N, c, h, w]`` (fp32)."""
        from diffusers import FluxPipeline

        n, c, h, w = x_t.shape
        f = self.codec.downsample_factor
        dtype = self.base_unet.dtype
        tokens = FluxPipeline._pack_latents(x_t.to(dtype), n, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, x_t.device, dtype)
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=x_t.device, dtype=dtype)
        out = self.unet(
            hidden_states=tokens,
            timestep=(t / 1000).to(dtype),
            guidance=guidance.to(dtype) if guidance is not None else None,
            pooled_projections=pooled_projections.to(dtype),
            encoder_hidden_states=encoder_hidden_states.to(dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
        ).sample
        return FluxPipeline._unpack_latents(out, h * f, w * f, f).float()

    # ---- sampling: the pipeline's timesteps ---------------------------------------------------
    def sampling_schedule(self, scheduler, shape, num_inference_steps):
        """``FluxPipeline``: sigmas ``linspace(1, 1/N, N)`` (none for a scheduler with flow sigmas) and the
        resolution shift ``mu`` of the image's token count."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = scheduler.config
        sigmas = None if c.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift(self.image_seq_len(shape), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        return filter_set_timesteps(scheduler, sigmas=sigmas, mu=mu)
