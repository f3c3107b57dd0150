"""ControlNet (Zhang et al. 2023) as a part of any family diffusers has a ControlNet model for: a
trainable copy of the backbone's first blocks reads a control image (edges, strokes, depth, ...) and
adds its features to the frozen backbone, as diffusers' ``examples/controlnet/train_controlnet*.py``:

    residuals = controlnet(x_t, t, text, controlnet_cond=control)     # zero-initialised outputs
    out = backbone(x_t, t, text, **residuals)                           # the family's own call

| backbone | ControlNet | residuals the backbone takes | control input |
|---|---|---|---|
| ``UNet2DConditionModel`` (SD, SDXL) | ``ControlNetModel.from_unet`` | ``down_block_additional_residuals``, ``mid_block_additional_residual`` | pixels in [0, 1] |
| ``SD3Transformer2DModel`` | ``SD3ControlNetModel.from_transformer`` | ``block_controlnet_hidden_states`` | VAE latents |
| ``FluxTransformer2DModel`` | ``FluxControlNetModel.from_transformer`` | ``controlnet_block_samples``, ``controlnet_single_block_samples`` | packed VAE latents |

``Controlled`` wraps the backbone's call so a family's ``forward`` runs unchanged (``modules/latent.py``);
the control input is the family's ``control_input``. Export: the ControlNet folder (``export/controlnet.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from diffusion_lab.utils.errors import ConfigError

# SD 1.x's conditioning embedding: 512 px control -> 64 px latents (three stride-2 convolutions)
SD_CONDITIONING_CHANNELS = (16, 32, 96, 256)
# what each ControlNet class returns (return_dict=False), as the backbone's keyword arguments
RESIDUALS = {
    "ControlNetModel": ("down_block_additional_residuals", "mid_block_additional_residual"),
    "SD3ControlNetModel": ("block_controlnet_hidden_states",),
    "FluxControlNetModel": ("controlnet_block_samples", "controlnet_single_block_samples"),
}


def controlnet_from_backbone(
    backbone: torch.nn.Module,
    downsample_factor: int,
    pretrained: str | None = None,
    num_layers: int | None = None,
    num_single_layers: int | None = None,
    conditioning_embedding_out_channels: Sequence[int] | None = None,
    conditioning_channels: int = 3,
    local_files_only: bool = False,
):
    """The ControlNet of ``backbone``'s class: loaded from ``pretrained`` (a ControlNet folder or hub id,
    to go on training one), else initialised from the backbone's weights (``from_unet`` /
    ``from_transformer``; ``num_layers`` / ``num_single_layers``: how many transformer blocks it copies,
    None = diffusers' script defaults capped at the backbone's). A UNet ControlNet's conditioning
    embedding down-samples the control image by the VAE's factor: ``conditioning_embedding_out_channels``
    has log2(factor) + 1 entries (None: the first ones of SD's (16, 32, 96, 256))."""
    from diffusers import ControlNetModel, FluxControlNetModel, SD3ControlNetModel

    kind = type(backbone).__name__
    if pretrained:
        from diffusion_lab.components.pretrained import from_pretrained

        cls = {"SD3Transformer2DModel": "SD3ControlNetModel", "FluxTransformer2DModel": "FluxControlNetModel"}.get(kind, "ControlNetModel")
        return from_pretrained(f"diffusers.{cls}", pretrained, local_files_only=local_files_only, key="controlnet.build.pretrained")
    if kind == "SD3Transformer2DModel":
        # the transformer's last block is context_pre_only (no text output): a ControlNet copies at most the ones before it
        return SD3ControlNetModel.from_transformer(backbone, num_layers=min(num_layers or 12, backbone.config.num_layers - 1), num_extra_conditioning_channels=0)
    if kind == "FluxTransformer2DModel":
        c = backbone.config
        return FluxControlNetModel.from_transformer(
            backbone, num_layers=min(num_layers or 4, c.num_layers), num_single_layers=min(num_single_layers or 10, c.num_single_layers),
            attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads,
        )
    levels = int(math.log2(downsample_factor)) + 1
    channels = tuple(conditioning_embedding_out_channels or SD_CONDITIONING_CHANNELS[:levels])
    if len(channels) != levels or 2 ** (levels - 1) != downsample_factor:
        raise ConfigError(
            f"controlnet.build.conditioning_embedding_out_channels={list(channels)} down-samples the control image "
            f"{2 ** (len(channels) - 1)}x, but the VAE down-samples {downsample_factor}x (vae.block_out_channels): give it "
            f"{levels} entries (e.g. {list(SD_CONDITIONING_CHANNELS[:levels])}), or null to pick them."
        )
    return ControlNetModel.from_unet(backbone, conditioning_embedding_out_channels=channels, conditioning_channels=conditioning_channels)


@dataclass
class ControlNetPart:
    """``controlnet=from_backbone``: how the ControlNet is built (``build(backbone=, downsample_factor=)``),
    the scale of its residuals (the pipelines' ``controlnet_conditioning_scale``, in training and previews)
    and how many training controls previews cycle through when the sample grid gives none."""

    build: Callable[..., torch.nn.Module]
    conditioning_scale: float = 1.0
    preview_images: int = 16


class Controlled:
    """``backbone`` steered by ``controlnet``: called as the backbone is, plus ``controlnet_cond``.
    Not a module: both stay the LightningModule's own children (checkpoint keys ``backbone.*``, ``controlnet.*``)."""

    def __init__(self, backbone: torch.nn.Module, controlnet: torch.nn.Module, conditioning_scale: float) -> None:
        self.backbone, self.controlnet, self.conditioning_scale = backbone, controlnet, conditioning_scale
        self.config = backbone.config

    def __call__(self, *args, controlnet_cond: torch.Tensor, **kwargs):
        out = self.controlnet(*args, controlnet_cond=controlnet_cond.to(self.controlnet.dtype), conditioning_scale=self.conditioning_scale, return_dict=False, **kwargs)
        residuals = dict(zip(RESIDUALS[type(self.controlnet).__name__], out))
        return self.backbone(*args, **kwargs, **residuals)
