"""FLUX.1 (Black Forest Labs 2024): rectified flow with an MMDiT (``FluxTransformer2DModel``: double-
then single-stream blocks, RoPE over 3-axis position ids) on 16-channel VAE latents whose 2x2 patches
are packed into 64-channel tokens. Conditioned on T5 states and CLIP's pooled embedding
(``components/text_mmdit.FluxTextConditioner``, exactly ``FluxPipeline.encode_prompt``). FLUX.1-dev is
guidance-distilled: the guidance scale is an input the transformer embeds, not classifier-free
guidance. Exports a ``FluxPipeline``; trains as diffusers' ``train_dreambooth_lora_flux.py`` does."""

from __future__ import annotations

import numpy as np
import torch

from diffusion_lab.compat.diffusers import flux_latent_image_ids, flux_pack_latents, flux_unpack_latents
from diffusion_lab.families.base import Family, control_latents, filter_set_timesteps
from diffusion_lab.families.sd3 import StableDiffusion3


def pack(x: torch.Tensor) -> torch.Tensor:
    """Latents ``[N, c, h, w]`` -> tokens ``[N, hw/4, 4c]`` (``FluxPipeline._pack_latents``)."""
    n, c, h, w = x.shape
    return flux_pack_latents(x, n, c, h, w)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens ``[N, hw/4, 4c]`` -> latents ``[N, c, h, w]`` (``FluxPipeline._unpack_latents`` at factor 1)."""
    return flux_unpack_latents(tokens, h, w, 1)


def image_ids(h: int, w: int, device, dtype, first: float = 0.0) -> torch.Tensor:
    """``[hw/4, 3]`` position ids (first axis, row, column) of the packed tokens of ``h x w`` latents."""
    ids = flux_latent_image_ids(1, h // 2, w // 2, device, dtype)
    ids[:, 0] = first
    return ids


class Flux(StableDiffusion3):
    """``FluxTransformer2DModel`` on packed latents. The shared sampler and process see unpacked latents
    ``[N, 16, h, w]`` (Euler steps are element-wise, so packing commutes with them); ``forward`` packs.

    Args:
        guidance: the distilled guidance the transformer embeds while training (diffusers' Flux scripts:
            3.5); ignored by a transformer without ``guidance_embeds`` (schnell).
        sample_guidance: the guidance of previews when none is given (``FluxPipeline``'s default, 3.5).
    """

    name = "latent_flux"
    pipeline_class = "FluxPipeline"
    controlnet_pipeline_class = "FluxControlNetPipeline"
    encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    cfg = False  # FluxPipeline samples without classifier-free guidance; guidance_scale is embedded
    refuses = {"textual_inversion": None}  # its CLIP learns the token (and T5 with adapter.t5): FluxPipeline.load_textual_inversion
    packing = 2

    def __init__(self, guidance: float = 3.5, sample_guidance: float = 3.5) -> None:
        self.guidance, self.sample_guidance = guidance, sample_guidance

    def conditioning(self, module, batch: dict | None, n: int, sampling: bool) -> dict[str, torch.Tensor]:
        """``{"guidance": [n]}`` for a guidance-distilled transformer: ``guidance`` while training, the
        sampling call's ``guidance_scale`` (else ``sample_guidance``) in previews; else nothing."""
        if not module.base_backbone.config.get("guidance_embeds"):
            return {}
        value = (batch or {}).get("guidance_scale", self.sample_guidance) if sampling else self.guidance
        return {"guidance": torch.full((n,), float(value), device=module.device)}

    def control_input(self, module, images: torch.Tensor) -> torch.Tensor:
        """The control image's VAE latents, packed into tokens (``FluxControlNetPipeline.prepare_image`` +
        ``_pack_latents``; here the posterior mean)."""
        return pack(control_latents(module, images))

    def forward(self, backbone, x_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states, pooled_projections, guidance=None, **controls) -> torch.Tensor:
        """``[N, c, h, w]`` at timesteps ``t`` = sigma x 1000 -> velocity ``[N, c, h, w]``."""
        h, w = x_t.shape[-2:]
        out = backbone(
            hidden_states=pack(x_t),
            timestep=(t / 1000).to(x_t.dtype),
            guidance=guidance,
            pooled_projections=pooled_projections,
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=torch.zeros(encoder_hidden_states.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
            img_ids=image_ids(h, w, x_t.device, x_t.dtype),
            **controls,
        ).sample
        return unpack(out, h, w)

    def sampling_schedule(self, backbone, scheduler, shape, num_inference_steps):
        """``FluxPipeline``: sigmas ``linspace(1, 1/N, N)`` (none for a scheduler with flow sigmas) and the
        resolution shift ``mu`` of the image's token count."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = scheduler.config
        sigmas = None if c.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift(self.image_seq_len(backbone, shape), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        return filter_set_timesteps(scheduler, sigmas=sigmas, mu=mu)

    def pipeline_parts(self, backbone, vae, scheduler, encoders, tokenizers) -> dict:
        return Family.pipeline_parts(self, backbone, vae, scheduler, encoders, tokenizers)  # no T5 slot to fill
