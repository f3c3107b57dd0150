"""SDXL base (Podell et al. 2023): ``LatentDiffusion`` conditioned the SDXL way. Two text encoders
give cross-attention states and a pooled embedding; the pooled embedding and the size/crop
micro-conditioning ("time ids") enter the UNet through ``added_cond_kwargs``. Differs from
``LatentDiffusion`` only in conditioning, denoise and export, and trains as diffusers'
``examples/text_to_image/train_text_to_image_lora_sdxl.py`` does (full fine-tune or LoRA)."""

from __future__ import annotations

import torch

from diffusion_lab.components.checks import check_sdxl_parts
from diffusion_lab.components.text import DualTextConditioner
from diffusion_lab.modules.diffusion_module import batch_len
from diffusion_lab.modules.latent import LatentDiffusion
from diffusion_lab.utils.errors import ConfigError


class LatentDiffusionXL(LatentDiffusion):
    """``UNet2DConditionModel`` with ``addition_embed_type="text_time"`` on scaled VAE latents.

    Conditioning is one flat dict (the shared sampler concatenates cond/uncond per key):
    ``encoder_hidden_states`` ``[N, 77, D1 + D2]``, ``text_embeds`` ``[N, P]`` (pooled, encoder 2)
    and ``time_ids`` ``[N, 6]``; ``denoise`` packs the last two into ``added_cond_kwargs``.
    Dropped captions (``caption_dropout``) are encoded as "", as diffusers' SDXL scripts do.

    Args:
        conditioner: a ``DualTextConditioner`` (``text_encoder=sdxl_pretrained``).
        force_zeros_for_empty_prompt: the unconditional half of guidance is zeros, as
            ``StableDiffusionXLPipeline`` does with no negative prompt (SDXL base's setting); false: the
            encoded "". Written into exported pipelines, so previews and exports agree.
        **kwargs: as ``LatentDiffusion`` (``unet_lora``/``text_lora``: LoRA on the UNet / both encoders).
    """

    family = "latent_sdxl"
    text_keys = ("encoder_hidden_states", "text_embeds")
    cached_batch_keys = ("original_size", "crop_top_left")

    def __init__(
        self,
        unet: torch.nn.Module,
        process,
        sampler,
        optimizer,
        codec,
        conditioner: DualTextConditioner,
        force_zeros_for_empty_prompt: bool = True,
        **kwargs,
    ) -> None:
        check_sdxl_parts(unet, conditioner)
        if kwargs.get("safety_checker"):
            raise ConfigError("model.safety_checker: SDXL pipelines have no safety checker; leave it null for model=latent_sdxl.")
        super().__init__(unet, process, sampler, optimizer, codec, conditioner, **kwargs)

    # ---- conditioning -----------------------------------------------------------------------
    def text_states(self, captions: list[str]) -> dict[str, torch.Tensor]:
        states, pooled = self.conditioner(captions)
        return {"encoder_hidden_states": states, "text_embeds": pooled}

    def time_ids(self, n: int, batch: dict | None = None) -> torch.Tensor:
        """``[n, 6]``: (original size h, w; crop top, left; target size h, w) per image, the order of
        ``StableDiffusionXLPipeline._get_add_time_ids`` (SDXL's size/crop micro-conditioning, sec. 2.2).

        Original size and crop come from the batch's ``original_size`` / ``crop_top_left`` (``[n, 2]``
        each) where the data records them (``data=image_folder`` does: the size before resizing and
        the crop in the resized image, as diffusers' SDXL script records them); the target size is
        the batch's image size (an aspect-ratio bucket, ``data.buckets=true``). Without them every
        image counts as a native, uncropped ``resolution`` square: (r, r, 0, 0, r, r), which is also
        what the pipeline uses by default at height = width = r."""
        batch = batch or {}
        r = self.hparams.resolution
        target = torch.tensor([self._image_size(batch) or (r, r)], dtype=torch.float32).expand(n, 2)
        original = batch.get("original_size", target)
        crop = batch.get("crop_top_left", torch.zeros(n, 2))
        return torch.cat([torch.as_tensor(v).float().to(self.device) for v in (original, crop, target)], dim=1)

    def _image_size(self, batch: dict) -> tuple[int, int] | None:
        """(h, w) of the batch's images, from the pixels or the cached latents (x the VAE factor)."""
        if "pixel_values" in batch:
            return tuple(batch["pixel_values"].shape[-2:])
        if "latent_moments" in batch:
            f = self.codec.downsample_factor
            return tuple(s * f for s in batch["latent_moments"].shape[-2:])
        return None

    def conditioning(self, batch: dict, train: bool) -> dict[str, torch.Tensor]:
        return {**super().conditioning(batch, train), "time_ids": self.time_ids(batch_len(batch), batch)}

    def sampling_conditioning(self, cond_batch: dict | None, n: int):
        cond, uncond = super().sampling_conditioning(cond_batch, n)
        if self.hparams.force_zeros_for_empty_prompt:
            uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
        time_ids = self.time_ids(n)
        return {**cond, "time_ids": time_ids}, {**uncond, "time_ids": time_ids}

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """Inputs cast to the UNet's dtype, output fp32 (as ``LatentDiffusion.denoise``)."""
        dtype = self.base_unet.dtype
        added = {"text_embeds": text_embeds.to(dtype), "time_ids": time_ids.to(dtype)}
        return self.unet(x_t.to(dtype), t, encoder_hidden_states=encoder_hidden_states.to(dtype), added_cond_kwargs=added).sample.float()

    # ---- export -----------------------------------------------------------------------------
