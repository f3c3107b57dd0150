"""Stable Diffusion 1.x / 2.x (Rombach et al. 2022): a ``UNet2DConditionModel`` on VAE latents,
cross-attending to one CLIP text encoder's last hidden states (``components/text.TextConditioner``,
exactly ``StableDiffusionPipeline.encode_prompt``). Exports a ``StableDiffusionPipeline``; LoRA runs
also write the kohya / A1111 key layout (``lora_kohya.safetensors``, ``export/kohya.py``)."""

from __future__ import annotations

import torch

from diffusion_lab.components.checks import check_latent_parts
from diffusion_lab.families.base import Family, source
from diffusion_lab.utils.errors import ConfigError


class StableDiffusion(Family):
    name = "latent_sd"
    pipeline_class = "StableDiffusionPipeline"
    controlnet_pipeline_class = "StableDiffusionControlNetPipeline"
    backbone_name = "unet"
    refuses = {"textual_inversion": None}  # adapter=textual_inversion: its one CLIP encoder (components/embeddings.py)
    processes = ("vp", "edm")
    process_limits = (
        "StableDiffusionPipeline cannot run a flow-matching sampler (diffusers' flow schedulers have no "
        "scale_model_input / init_noise_sigma); use process=vp (or edm) for SD 1.x/SDXL UNets."
    )

    def check_parts(self, backbone, codec, conditioner, resolution: int, image_channels: int) -> None:
        if backbone.config.get("addition_embed_type") == "text_time":
            raise ConfigError(
                f"backbone{source(backbone)} is an SDXL UNet (text_time added conditioning: pooled text + size/crop time ids), "
                f"but model={self.name} is SD 1.x/2.x with one text encoder; use model=latent_sdxl for an SDXL pipeline."
            )
        check_latent_parts(backbone, codec, conditioner, resolution, image_channels)

    def text_states(self, conditioner, captions: list[str]) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": conditioner(captions)}

    def forward(self, backbone, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return backbone(x_t, t, **cond).sample

    def pipeline(self, backbone, vae, scheduler, encoders, tokenizers, **extra):
        extra = {"safety_checker": None, "feature_extractor": None, **extra}
        return super().pipeline(backbone, vae, scheduler, encoders, tokenizers, requires_safety_checker=extra["safety_checker"] is not None, **extra)
