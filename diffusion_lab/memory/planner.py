"""One architecture, planned under many settings: counts and activation traces are computed once
per (adapter, compute dtype) and reused while the switches vary (``budget.breakdown`` does the math).

    planner = Planner(arch, resolution=1024, lora=lora_config(rank=16, target_modules=[...]))
    b = planner.breakdown(Settings(precision="bf16-mixed", adapter=True, gradient_checkpointing=True, batch=2))
"""

from __future__ import annotations

import functools

import torch

from diffusion_lab.memory.architecture import Architecture, backbone_counts, backbone_model
from diffusion_lab.memory.trace import trace_activations
from diffusion_lab.memory.budget import K_SAVED, Breakdown, Counts, Settings, Trace, breakdown, compute_mode


class Planner:
    def __init__(self, arch: Architecture, resolution: int, lora=None, k_saved: float = K_SAVED):
        self.arch, self.resolution, self.lora, self.k_saved = arch, resolution, lora, k_saved

    @functools.cache
    def counts(self, adapter: bool) -> Counts:
        return backbone_counts(self.arch, self.lora if adapter else None)

    @functools.cache
    def model(self, adapter: bool) -> torch.nn.Module:
        return backbone_model(self.arch, self.lora if adapter else None)

    @functools.cache
    def trace(self, adapter: bool, compute: str, base_dtype: str = "float32") -> Trace:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[base_dtype]
        runs = [trace_activations(self.arch, self.resolution, batch, compute, base_dtype=dtype, model=self.model(adapter)) for batch in (1, 2)]
        return Trace(runs[0].saved, runs[1].saved, runs[0].checkpointed, runs[1].checkpointed, runs[0].largest_unit, runs[1].largest_unit)

    def breakdown(self, s: Settings) -> Breakdown:
        if s.adapter and self.lora is None:
            raise ValueError("adapter=True needs the Planner's lora config")
        return breakdown(self.counts(s.adapter), self.trace(s.adapter, compute_mode(s), s.base_dtype if s.adapter else "float32"), s, self.k_saved)
