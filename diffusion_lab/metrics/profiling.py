"""Measurements that check the speed switches (``diffusion_lab.components.speed``) and give MFU.

``attention_kernels`` names the aten attention ops a call really runs (which SDPA backend, or none);
``train_step_flops`` counts a training step's FLOPs for model FLOP utilisation (MFU), whose
denominator is ``peak_bf16_flops``.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from diffusion_lab.compat.torch import TorchDispatchMode

# Dense bf16 tensor-core peak (no sparsity), from NVIDIA's datasheets; the MFU denominator.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM5 (80GB HBM3)
    "H200": 989e12,
    "A100": 312e12,
}


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


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU named like ``torch.cuda.get_device_name()`` (None: unknown)."""
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in device_name:
            return PEAK_BF16_FLOPS[key]
    return None


# ---- process memory on Linux (CPU runs: torch's CPU allocator keeps no statistics) -------------------
def status_kb(*keys: str) -> dict[str, int]:
    """``/proc/self/status`` fields in KiB (``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile``)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) for k in keys}


def settle() -> None:
    """Free what is unreferenced and hand glibc's free heap pages back to the OS."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current ``VmRSS`` (Linux >= 4.0: ``echo 5 > /proc/PID/clear_refs``); checked."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    now = status_kb("VmRSS", "VmHWM")
    if now["VmHWM"] > now["VmRSS"] + 4096:
        raise RuntimeError(f"/proc/self/clear_refs did not reset VmHWM: {now}")
