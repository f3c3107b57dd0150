"""The switches that bring a plan under a budget, cheapest first (what each costs in speed or
quality is said beside it). ``fit`` applies them one by one while they lower the peak, stops when
it fits, then drops any switch the fit does not need.

    steps, ok = fit(planner, settings, budget_bytes)   # [(override, why, peak bytes after), ...]
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

from diffusion_lab.memory.budget import Settings

Switch = tuple[str, str, Callable[[Settings], Settings]]


def candidates(s: Settings, global_batch: int) -> Iterator[Switch]:
    """(override to paste, its cost, the settings it gives), in the order to try them."""
    if s.ema == "model":
        yield "callbacks.ema.device=cpu", "EMA in host memory (no cost on the device)", lambda x: x.with_(ema="cpu")
    if s.optimizer == "adamw" and not s.fused_optimizer and s.accelerator != "cpu":
        yield "model.optimizer.fused=true", "fused AdamW: no full-size step temporaries", lambda x: x.with_(fused_optimizer=True)
    if not s.offload_frozen:
        yield "model.offload_frozen=true", "VAE + text encoders encode on CPU (or once, cached)", lambda x: x.with_(offload_frozen=True)
    if not s.gradient_checkpointing:
        yield "model.gradient_checkpointing=true", "recompute activations in backward (~25% slower)", lambda x: x.with_(gradient_checkpointing=True)
    if s.precision == "32-true":
        yield "trainer.precision=bf16-mixed", "bf16 activations (fp32 master weights kept)", lambda x: x.with_(precision="bf16-mixed")
    if s.optimizer == "adamw":
        yield "optimizer@model.optimizer=adamw_8bit", "8-bit AdamW states (bitsandbytes, GPU)", lambda x: x.with_(optimizer="adamw_8bit")
    if not s.adapter:
        yield "adapter=lora", "train a LoRA instead of every weight", lambda x: x.with_(adapter=True, base_dtype="bfloat16" if x.precision != "32-true" else "float32")
    yield "adapter.base_dtype=bfloat16", "frozen base in bf16", lambda x: x.with_(base_dtype="bfloat16") if x.adapter else x
    yield "quantization=int8", "frozen base in int8 (QLoRA)", lambda x: x.with_(quantization="int8", quant_backend="bitsandbytes") if x.adapter and x.quantization is None else x
    yield "quantization=nf4", "frozen base in 4-bit NormalFloat (QLoRA)", lambda x: x.with_(quantization="nf4", quant_backend="bitsandbytes") if x.adapter and x.quantization in (None, "int8", "float8") else x
    if s.world_size > 1 and not s.sharded:
        yield "trainer=fsdp", f"shard weights, gradients and optimizer state over {s.world_size} devices", lambda x: x.with_(sharded=True)
    per_rank = s.batch
    while per_rank > 1:
        per_rank //= 2
        k = math.ceil(s.batch / per_rank)
        yield (
            f"data.batch_size={per_rank * s.world_size} trainer.accumulate_grad_batches={k * s.accumulate}",
            f"{per_rank} per rank, the same global batch {global_batch} by accumulation (slower)",
            lambda x, b=per_rank, acc=k * s.accumulate: x.with_(batch=b, accumulate=acc),
        )


def fit(planner, s: Settings, budget: float, exclude: tuple[str, ...] = ()) -> tuple[list[tuple[str, str, float]], bool]:
    """Greedy: each switch that lowers the peak is kept until the peak is <= ``budget``; then the
    kept switches the fit does not need are dropped (latest first). Returns the steps with the peak
    after each, and whether it fits. ``exclude``: override prefixes not to try (e.g. ``("adapter=",)``)."""
    global_batch = s.batch * s.world_size
    current = planner.breakdown(s).total
    if current <= budget:
        return [], True
    kept: list[Switch] = []
    x = s
    for switch in candidates(s, global_batch):
        if switch[0].startswith(exclude):
            continue
        y = switch[2](x)
        if y == x:
            continue
        t = planner.breakdown(y).total
        if t < current:
            kept.append(switch)
            x, current = y, t
            if current <= budget:
                break
    ok = current <= budget
    if ok:  # drop switches the fit does not need (a batch split makes checkpointing unneeded, ...)
        for sw in reversed(list(kept[:-1])):
            trial = [k for k in kept if k is not sw]
            if _apply(s, trial) is not None and planner.breakdown(_apply(s, trial)).total <= budget:
                kept = trial
    steps, y = [], s
    for override, why, fn in kept:
        y = fn(y)
        steps.append((override, why, planner.breakdown(y).total))
    return steps, ok


def _apply(s: Settings, switches: list[Switch]) -> Settings:
    for _, _, fn in switches:
        s = fn(s)
    return s
