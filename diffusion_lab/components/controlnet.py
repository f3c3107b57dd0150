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
| ``QwenImageTransformer2DModel`` | ``QwenImageControlNetModel.from_transformer`` | ``controlnet_block_samples`` | packed VAE latents |
| ``SanaTransformer2DModel`` | ``SanaControlNetModel`` of its config, its first blocks copied | ``controlnet_block_samples`` | VAE latents |
| ``ZImageTransformer2DModel`` | ``ZImageControlNetModel`` (control blocks copied from its layers; embedders and refiners shared, ``from_transformer``) | ``controlnet_block_samples`` (layer -> residual) | VAE latents |

``Controlled`` wraps the backbone's call so a family's ``forward`` runs unchanged (``modules/latent.py``);
the control input is the family's ``control_input``. Export: the ControlNet folder (``export/controlnet.py``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from diffusion_lab.utils.errors import ConfigError

# SD 1.x's conditioning embedding: 512 px control -> 64 px latents (three stride-2 convolutions)
SD_CONDITIONING_CHANNELS = (16, 32, 96, 256)
# what each ControlNet class returns (return_dict=False), as the backbone's keyword arguments
RESIDUALS = {
    "ControlNetModel": ("down_block_additional_residuals", "mid_block_additional_residual"),
    "SD3ControlNetModel": ("block_controlnet_hidden_states",),
    "FluxControlNetModel": ("controlnet_block_samples", "controlnet_single_block_samples"),
    "QwenImageControlNetModel": ("controlnet_block_samples",),
    "SanaControlNetModel": ("controlnet_block_samples",),
    "ZImageControlNetModel": ("controlnet_block_samples",),
}
# backbone class -> its ControlNet class (to load a ``pretrained`` one); a UNet's is ControlNetModel
CONTROLNETS = {
    "SD3Transformer2DModel": "SD3ControlNetModel",
    "FluxTransformer2DModel": "FluxControlNetModel",
    "QwenImageTransformer2DModel": "QwenImageControlNetModel",
    "SanaTransformer2DModel": "SanaControlNetModel",
    "ZImageTransformer2DModel": "ZImageControlNetModel",
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
    from diffusers import ControlNetModel, FluxControlNetModel, QwenImageControlNetModel, SD3ControlNetModel

    kind = type(backbone).__name__
    if pretrained:
        from diffusion_lab.components.pretrained import from_pretrained

        net = from_pretrained(f"diffusers.{CONTROLNETS.get(kind, 'ControlNetModel')}", pretrained, local_files_only=local_files_only, key="controlnet.build.pretrained")
        return share_z_image_parts(net, backbone) if kind == "ZImageTransformer2DModel" else net
    if kind == "SD3Transformer2DModel":
        # the transformer's last block is context_pre_only (no text output): a ControlNet copies at most the ones before it
        return SD3ControlNetModel.from_transformer(backbone, num_layers=min(num_layers or 12, backbone.config.num_layers - 1), num_extra_conditioning_channels=0)
    if kind == "FluxTransformer2DModel":
        c = backbone.config
        return FluxControlNetModel.from_transformer(
            backbone, num_layers=min(num_layers or 4, c.num_layers), num_single_layers=min(num_single_layers or 10, c.num_single_layers),
            attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads,
        )
    if kind == "QwenImageTransformer2DModel":
        c = backbone.config  # InstantX's Qwen-Image ControlNets: 5 blocks
        return QwenImageControlNetModel.from_transformer(
            backbone, num_layers=min(num_layers or 5, c.num_layers), attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads
        )
    if kind == "SanaTransformer2DModel":
        return sana_controlnet(backbone, num_layers)
    if kind == "ZImageTransformer2DModel":
        return z_image_controlnet(backbone, num_layers)
    levels = int(math.log2(downsample_factor)) + 1
    channels = tuple(conditioning_embedding_out_channels or SD_CONDITIONING_CHANNELS[:levels])
    if len(channels) != levels or 2 ** (levels - 1) != downsample_factor:
        raise ConfigError(
            f"controlnet.build.conditioning_embedding_out_channels={list(channels)} down-samples the control image "
            f"{2 ** (len(channels) - 1)}x, but the VAE down-samples {downsample_factor}x (vae.block_out_channels): give it "
            f"{levels} entries (e.g. {list(SD_CONDITIONING_CHANNELS[:levels])}), or null to pick them."
        )
    return ControlNetModel.from_unet(backbone, conditioning_embedding_out_channels=channels, conditioning_channels=conditioning_channels)


# Sana transformers SanaControlNetModel cannot mirror (it has no guidance embedding and no q/k norm, and
# SanaControlNetPipeline feeds the transformer unscaled timesteps): config key -> the only value it takes
SANA_PLAIN = {"guidance_embeds": False, "qk_norm": None, "timestep_scale": 1.0}
# what a ZImageControlNetModel borrows from its transformer (``from_transformer``), not its own weights
Z_IMAGE_SHARED = ("t_embedder", "all_x_embedder", "cap_embedder", "noise_refiner", "context_refiner", "x_pad_token", "cap_pad_token")


def sana_controlnet(backbone: torch.nn.Module, num_layers: int | None = None):
    """``SanaControlNetModel`` of a ``SanaTransformer2DModel``'s config with its embedders and first ``num_layers``
    blocks copied (None: 7, the layout of NVIDIA's Sana ControlNets, capped at the backbone's); its input block
    and per-block projections are zero, so it adds nothing until trained (diffusers has no ``from_transformer``)."""
    from diffusers import SanaControlNetModel

    c = backbone.config
    odd = {k: c.get(k) for k, v in SANA_PLAIN.items() if c.get(k, v) != v}
    if odd:
        raise ConfigError(
            f"controlnet=from_backbone: the Sana transformer has {odd}, which SanaControlNetModel / SanaControlNetPipeline cannot "
            f"mirror (they take Sana 1.0's transformer: {SANA_PLAIN}); use controlnet=none with this model.pretrained."
        )
    accepted = inspect.signature(SanaControlNetModel.__init__).parameters
    config = {k: v for k, v in c.items() if k in accepted and not k.startswith("_")}
    net = SanaControlNetModel(**{**config, "num_layers": min(num_layers or 7, c.num_layers)})
    for name in ("patch_embed", "time_embed", "caption_projection", "caption_norm"):
        getattr(net, name).load_state_dict(getattr(backbone, name).state_dict())
    for block, source in zip(net.transformer_blocks, backbone.transformer_blocks):
        block.load_state_dict(source.state_dict())
    return net


def z_image_controlnet(backbone: torch.nn.Module, num_layers: int | None = None):
    """``ZImageControlNetModel`` (VACE-style, as Alibaba's Z-Image Fun ControlNets) of a ``ZImageTransformer2DModel``:
    ``num_layers`` control blocks (None: 6, the Fun ControlNet Union 1.0 layout, capped) steering transformer layers
    0, k, 2k, ... , each a copy of the layer it steers with zero in/out projections, its control refiner a copy of
    the noise refiner; embedders and refiners are the transformer's own (shared, frozen)."""
    from diffusers import ZImageControlNetModel

    c = backbone.config
    n = min(num_layers or 6, c.n_layers)
    places = list(range(0, c.n_layers, math.ceil(c.n_layers / n)))
    keys = ("all_patch_size", "all_f_patch_size", "dim", "n_refiner_layers", "n_heads", "n_kv_heads", "norm_eps", "qk_norm")
    net = ZImageControlNetModel(control_layers_places=places, control_in_dim=c.in_channels, **{k: c[k] for k in keys})
    for block, i in zip(net.control_layers, places):
        block.load_state_dict(backbone.layers[i].state_dict(), strict=False)  # before_proj / after_proj stay zero
    for block, source in zip(net.control_noise_refiner, backbone.noise_refiner):
        block.load_state_dict(source.state_dict())
    return share_z_image_parts(net, backbone)


def share_z_image_parts(net, backbone):
    """A ZImageControlNetModel runs on its transformer's embedders and refiners (``from_transformer``, as
    ``ZImageControlNetPipeline.__init__`` does). diffusers 0.42's ``__init__`` never sets the
    ``gradient_checkpointing`` flag its ``forward`` reads when gradients are on (inference only there): set here."""
    net.gradient_checkpointing = getattr(net, "gradient_checkpointing", False)
    return type(net).from_transformer(net, backbone)


@contextmanager
def own_weights(net: torch.nn.Module):
    """``net`` without the parts it borrows from its transformer while inside (a ZImageControlNetModel's
    ``Z_IMAGE_SHARED``): what its folder holds, as ``ZImageControlNetModel.from_pretrained`` builds it."""
    shared = {name: getattr(net, name) for name in Z_IMAGE_SHARED} if type(net).__name__ == "ZImageControlNetModel" else {}
    for name in shared:
        delattr(net, name)
        setattr(net, name, None)
    try:
        yield net
    finally:
        for name, part in shared.items():
            delattr(net, name)
            setattr(net, name, part)


def run_controlnet(controlnet: torch.nn.Module, args: tuple, kwargs: dict, cond: torch.Tensor, scale: float) -> dict[str, Any]:
    """``controlnet`` on the backbone's call (``args``, ``kwargs``) and the control input ``cond`` -> the
    residuals as the backbone's keyword arguments (``RESIDUALS``)."""
    kind = type(controlnet).__name__
    if kind == "ZImageControlNetModel":  # positional (x, t, cap_feats, control_context), per-image [C, 1, h, w]
        return {"controlnet_block_samples": controlnet(*args[:3], list(cond.unsqueeze(2).unbind(0)), conditioning_scale=scale)}
    out = controlnet(*args, **{**kwargs, "controlnet_cond": cond, "conditioning_scale": scale, "return_dict": False})
    if kind == "QwenImageControlNetModel":  # its block samples themselves, not a tuple of outputs
        out = (out,)
    return dict(zip(RESIDUALS[kind], out))


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
        residuals = run_controlnet(self.controlnet, args, kwargs, controlnet_cond.to(self.controlnet.dtype), self.conditioning_scale)
        return self.backbone(*args, **kwargs, **residuals)
