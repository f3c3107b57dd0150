"""Speed switches for the UNet, set from the config at run time.

    model.channels_last=true      conv weights in NHWC (faster convolutions on tensor cores / oneDNN)
    model.attention=sdpa|eager    diffusers' ``AttnProcessor2_0`` (``F.scaled_dot_product_attention``,
                                  fused kernels) or ``AttnProcessor`` (baddbmm + softmax + bmm)
    model.compile_backbone=true       ``torch.compile`` (DiffusionModule)
    model.optimizer.fused=true    torch's fused AdamW kernel (one kernel for all parameters; also
                                  under bf16-mixed with gradient clipping, see clip_fused_gradients)

What they do is measured with ``diffusion_lab.metrics.profiling`` (which attention kernels run,
FLOPs per training step).
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.utilities import GradClipAlgorithmType

from diffusion_lab.utils.errors import ConfigError

AttentionBackend = Literal["sdpa", "eager"]

_PROCESSORS = {"sdpa": AttnProcessor2_0, "eager": AttnProcessor}


def attention_modules(unet: torch.nn.Module) -> list[Attention]:
    """Every diffusers ``Attention`` block (self- and cross-attention) inside ``unet``."""
    return [m for m in unet.modules() if isinstance(m, Attention)]


def set_attention(unet: torch.nn.Module, backend: AttentionBackend) -> None:
    """Give every plain attention block of ``unet`` the processor of ``backend`` (weights unchanged).
    Blocks with a special processor (added KV, IP-adapter, ...) keep theirs."""
    if backend not in _PROCESSORS:
        raise ConfigError(f"model.attention={backend!r} is not an attention backend; use one of {sorted(_PROCESSORS)}.")
    for module in attention_modules(unet):
        if type(module.processor) in _PROCESSORS.values() and not isinstance(module.processor, _PROCESSORS[backend]):
            module.set_processor(_PROCESSORS[backend]())


def attention_processors(unet: torch.nn.Module) -> set[str]:
    """Class names of the attention processors ``unet`` holds, e.g. ``{"AttnProcessor2_0"}``."""
    return {type(m.processor).__name__ for m in attention_modules(unet)}


def apply_speed_switches(unet: torch.nn.Module, channels_last: bool = False, attention: AttentionBackend = "sdpa") -> torch.nn.Module:
    """The UNet with its attention processors set and, if asked, 4-D weights in channels_last."""
    set_attention(unet, attention)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    return unet


def clip_fused_gradients(trainer, optimizer: torch.optim.Optimizer, clip_val: float | None, algorithm) -> bool:
    """Clip gradients for a fused optimizer under ``bf16-mixed``; returns False (nothing done)
    for any other case, which Lightning clips itself.

    Lightning's mixed-precision plugin refuses to clip before every fused step, for fp16's sake:
    the loss scaler unscales inside the fused kernel, so clipping first would see scaled
    gradients. bf16 has no scaler, the gradients are true values and clip as usual.
    """
    if not clip_val or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    plugin = trainer.precision_plugin
    if not isinstance(plugin, MixedPrecision):
        return False
    if plugin.scaler is not None:
        raise ConfigError(
            f"model.optimizer.fused=true cannot be combined with trainer.precision={trainer.precision} and "
            f"trainer.gradient_clip_val={clip_val}: fp16 loss scaling unscales the gradients inside the fused step, "
            f"so they cannot be clipped before it. Use trainer.precision=bf16-mixed, or model.optimizer.fused=false, "
            f"or trainer.gradient_clip_val=null."
        )
    Precision.clip_gradients(plugin, optimizer, clip_val, algorithm or GradClipAlgorithmType.NORM)
    return True
