"""Training methods other than the supervised diffusion loss (``method=``): preference and reward
fine-tuning, few-step distillation. ``method=supervised`` (the default) is the process's own loss."""

from diffusion_lab.methods.base import Method, frozen_reference

__all__ = ["Method", "frozen_reference"]
