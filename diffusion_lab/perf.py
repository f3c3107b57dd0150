"""Speed switches for the UNet and the measurements that check them.

    model.channels_last=true      conv weights in NHWC (faster convolutions on tensor cores / oneDNN)
    model.attention=sdpa|eager    diffusers' ``AttnProcessor2_0`` (``F.scaled_dot_product_attention``,
                                  fused kernels) or ``AttnProcessor`` (baddbmm + softmax + bmm)
    model.compile_unet=true       ``torch.compile`` (DiffusionModule)
    model.optimizer.fused=true    torch's fused AdamW kernel (one kernel for all parameters; also
                                  under bf16-mixed with gradient clipping, see clip_fused_gradients)

``attention_kernels`` names the aten attention ops a call really runs (which SDPA backend, or none);
``train_step_flops`` counts a training step's FLOPs for model FLOP utilisation (MFU).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Literal

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.utilities import GradClipAlgorithmType
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from diffusion_lab.utils.errors import ConfigError

AttentionBackend = Literal["sdpa", "eager"]

_PROCESSORS = {"sdpa": AttnProcessor2_0, "eager": AttnProcessor}

# Dense bf16 tensor-core peak (no sparsity), from NVIDIA's datasheets; the MFU denominator.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM5 (80GB HBM3)
    "H200": 989e12,
    "A100": 312e12,
}


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


class _OpCounter(TorchDispatchMode):
    def __init__(self, match: Callable[[str], bool]) -> None:
        super().__init__()
        self.match = match
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.match(name):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def attention_kernels(fn: Callable[[], object]) -> Counter[str]:
    """Run ``fn`` and count the aten attention kernels it dispatches, e.g.
    ``{"_scaled_dot_product_flash_attention_for_cpu": 4}`` (SDPA, CPU flash kernel) or
    ``{"_scaled_dot_product_efficient_attention": 4}`` (CUDA); empty for eager attention."""
    with _OpCounter(lambda name: "scaled_dot_product" in name) as counter:
        fn()
    return counter.counts


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's counter knows the CUDA SDPA kernels; the CPU flash kernel gets the same formula
_CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
}


def train_step_flops(step: Callable[[], torch.Tensor]) -> int:
    """FLOPs (2 per multiply-add) of ``step()`` (returns a loss) plus its backward: matmuls,
    convolutions and attention, counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        step().backward()
    return int(counter.get_total_flops())


def forward_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` run without gradients (a frozen encoder's forward)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        fn()
    return int(counter.get_total_flops())


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


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU named like ``torch.cuda.get_device_name()`` (None: unknown)."""
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in device_name:
            return PEAK_BF16_FLOPS[key]
    return None
