"""SDXL base (Podell et al. 2023): the SD UNet conditioned the SDXL way. Two text encoders give
cross-attention states and a pooled embedding (``components/text.DualTextConditioner``, exactly
``StableDiffusionXLPipeline.encode_prompt``); the pooled embedding and the size / crop
micro-conditioning ("time ids") enter the UNet through ``added_cond_kwargs``. Trains as diffusers'
``examples/text_to_image/train_text_to_image_lora_sdxl.py`` does; exports a ``StableDiffusionXLPipeline``."""

from __future__ import annotations

import torch

from diffusion_lab.components.checks import check_latent_parts, check_sdxl_parts
from diffusion_lab.families.sd import StableDiffusion
from diffusion_lab.families.base import Family


class StableDiffusionXL(StableDiffusion):
    """Args:
        force_zeros_for_empty_prompt: the unconditional half of guidance is zeros, as
            ``StableDiffusionXLPipeline`` does with no negative prompt (SDXL base's setting); false: the
            encoded "". Written into exported pipelines, so previews and exports agree.
    """

    name = "latent_sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    controlnet_pipeline_class = "StableDiffusionXLControlNetPipeline"
    encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    text_keys = ("encoder_hidden_states", "text_embeds")
    cached_batch_keys = ("original_size", "crop_top_left")
    refuses = {"textual_inversion": None}  # both CLIP encoders learn the token (diffusers' textual_inversion_sdxl.py)

    def __init__(self, force_zeros_for_empty_prompt: bool = True) -> None:
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    def check_parts(self, backbone, codec, conditioner, resolution: int, image_channels: int) -> None:
        check_sdxl_parts(backbone, conditioner)
        check_latent_parts(backbone, codec, conditioner, resolution, image_channels)

    def text_states(self, conditioner, captions: list[str]) -> dict[str, torch.Tensor]:
        states, pooled = conditioner(captions)
        return {"encoder_hidden_states": states, "text_embeds": pooled}

    def conditioning(self, module, batch: dict | None, n: int, sampling: bool) -> dict[str, torch.Tensor]:
        """``time_ids`` ``[n, 6]``: (original size h, w; crop top, left; target size h, w) per image, the
        order of ``StableDiffusionXLPipeline._get_add_time_ids`` (SDXL's micro-conditioning, sec. 2.2).
        Original size and crop come from the batch where the data records them (``data=image_folder``
        does, as diffusers' SDXL script); the target size is the batch's image size (an aspect-ratio
        bucket). Without them every image is a native, uncropped ``resolution`` square, which is also
        what the pipeline uses at height = width = resolution (previews)."""
        batch = {} if sampling or batch is None else batch
        r = module.hparams.resolution
        target = torch.tensor([image_size(batch, module.codec.downsample_factor) or (r, r)], dtype=torch.float32).expand(n, 2)
        original = batch.get("original_size", target)
        crop = batch.get("crop_top_left", torch.zeros(n, 2))
        return {"time_ids": torch.cat([torch.as_tensor(v).float().to(module.device) for v in (original, crop, target)], dim=1)}

    def unconditional(self, cond: dict, uncond: dict) -> dict:
        return {k: torch.zeros_like(v) for k, v in cond.items()} if self.force_zeros_for_empty_prompt else uncond

    def forward(self, backbone, x_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states, text_embeds, time_ids, **residuals) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return backbone(x_t, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added, **residuals).sample

    def pipeline(self, backbone, vae, scheduler, encoders, tokenizers, **extra):
        return Family.pipeline(self, backbone, vae, scheduler, encoders, tokenizers, force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt, **extra)


def image_size(batch: dict, factor: int) -> tuple[int, int] | None:
    """(h, w) of a batch's images, from the pixels or the cached latents (x the VAE factor)."""
    if "pixel_values" in batch:
        return tuple(batch["pixel_values"].shape[-2:])
    if "latent_moments" in batch:
        return tuple(s * factor for s in batch["latent_moments"].shape[-2:])
    return None
