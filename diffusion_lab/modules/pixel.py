"""Pixel-space diffusion: the diffused tensor is the image itself (identity first stage)."""

from __future__ import annotations

import torch
from diffusers import DDPMPipeline

from diffusion_lab.diffusion.sampling import class_labels
from diffusion_lab.modules.diffusion_module import DiffusionModule
from diffusion_lab.utils.io import atomic_dir


class PixelDiffusion(DiffusionModule):
    """``UNet2DModel`` on images in [-1, 1]. With ``class_conditional=True`` the UNet must have
    ``num_class_embeds`` and batches carry ``label``; sampling then draws labels 0..K-1 in turn."""

    family = "pixel_ddpm"

    def __init__(self, *args, class_conditional: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.class_conditional = class_conditional
        if class_conditional and not self.base_unet.config.num_class_embeds:
            raise ValueError(
                "model.class_conditional=true needs a UNet with class embeddings: set "
                "model.unet.num_class_embeds (e.g. 10 for digits), or set model.class_conditional=false."
            )

    def encode(self, batch: dict) -> torch.Tensor:
        return batch["pixel_values"]

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return x0

    def conditioning(self, batch: dict, train: bool) -> dict[str, torch.Tensor]:
        return {"class_labels": batch["label"]} if self.class_conditional else {}

    def sampling_conditioning(self, cond_batch: dict | None, n: int):
        if not self.class_conditional:
            return {}, None
        labels = cond_batch["label"] if cond_batch else class_labels(0, n, self.base_unet.config.num_class_embeds)
        return {"class_labels": labels.to(self.device)}, None

    def export(self, out_dir: str) -> None:
        """A ``DDPMPipeline`` folder that plain diffusers loads (``DDPMPipeline.from_pretrained``), with
        the configured sampler as its scheduler. ``DDPMPipeline.__call__`` neither scales the initial
        noise nor calls ``scale_model_input``: right for vp's DDPM/DDIM/DPM++ and for flow_matching,
        wrong for Euler/Heun and edm samplers, which ``diffusion_lab.sample`` runs correctly."""
        pipe = DDPMPipeline(unet=self.base_unet, scheduler=self.sampling_scheduler())
        with atomic_dir(out_dir) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
