"""``Method``: what a training step optimises when it is not the process's supervised loss.

``method=`` (``conf/method/``) picks one; the module calls it from its own hooks, so a method
composes with every model the project trains (pixel or latent, any process, full or LoRA, one or
many devices) without a subclass per model:

    setup("fit")      -> method.setup(module)           # reference model, data checks (ConfigError)
    training_step     -> method.training_step(module, batch, batch_idx) -> loss
    on_save_checkpoint / on_load_checkpoint -> method.state_dict() / load_state_dict()

``setup`` runs before Lightning restores a checkpoint and before the module is moved to its
device: the module holds the starting weights there, on a resume too, and ``load_state_dict``
(a resume) comes after it. Move what a method holds to ``module.device`` when it is used.

A method reaches the model only through the module's public pieces: ``module.encode`` /
``conditioning`` / ``process`` / ``denoise`` / ``generate`` / ``log``. The frozen *reference*
(the starting model, for DPO's and GRPO's KL) is ``frozen_reference(module)``: with an adapter it
is the same backbone with the adapter switched off (no second copy), else a frozen copy taken at
``setup``.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch

if TYPE_CHECKING:  # the module imports this file
    from diffusion_lab.modules.diffusion_module import DiffusionModule


class Method:
    """Base class; ``name`` is the ``method=`` option (for messages)."""

    name: str = "method"
    # the step count its exports sample with by default (``diffusion_lab.json``; None: the sampler's 50).
    # Distillation sets it to the student's; GRPO's own ``num_inference_steps`` is its training sampler's, not this.
    sample_steps: int | None = None
    # the guidance weight its exports sample with by default (``diffusion_lab.json``; None: ``guidance_scale``'s 7.5).
    # Distillation from a guided teacher sets 1: the guidance is in the student.
    sample_guidance: float | None = None

    def setup(self, module: "DiffusionModule") -> None:
        """Before the first step (the module's ``setup("fit")``, before a checkpoint is restored): build
        what the method needs, refuse what it cannot train with a ``ConfigError`` naming the key."""

    def training_step(self, module: "DiffusionModule", batch: dict, batch_idx: int) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What an exact resume needs beyond the module's weights and the optimizer (e.g. counters)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def has_adapter(backbone: torch.nn.Module) -> bool:
    """True when peft adapter layers (LoRA, DoRA, LoKr, LoHa) are injected into ``backbone``."""
    return bool(getattr(backbone, "peft_config", None))


@contextmanager
def adapter_disabled(backbone: torch.nn.Module) -> Iterator[None]:
    """The backbone as it was before the adapter: diffusers' ``disable_adapters`` / ``enable_adapters``."""
    backbone.disable_adapters()
    try:
        yield
    finally:
        backbone.enable_adapters()


class frozen_reference:  # noqa: N801 - used as ``with reference(): ...``
    """The starting model, for KL terms. ``with ref(): module.denoise(...)`` runs the reference
    through the module's own ``denoise`` (the family's packing, the backbone's dtype):

    - backbone with an adapter: the adapter is switched off inside the block (no copy);
    - full fine-tune: a frozen deep copy of the backbone taken when this is built, swapped in
      inside the block.

    Build it in ``Method.setup`` (the module's weights are the starting ones then, on a resume too)."""

    def __init__(self, module: "DiffusionModule") -> None:
        self.module = module
        self.copy = None
        if not has_adapter(module.base_backbone):
            self.copy = copy.deepcopy(module.base_backbone).requires_grad_(False).eval()

    @contextmanager
    def __call__(self) -> Iterator[None]:
        module = self.module
        with torch.no_grad():
            if self.copy is None:
                with adapter_disabled(module.base_backbone):
                    yield
                return
            trained = module._modules["backbone"]
            module._modules["backbone"] = self.copy.to(module.device)
            try:
                yield
            finally:
                module._modules["backbone"] = trained
