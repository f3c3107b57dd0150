"""Conditioning of pixel models: none, or class labels (``conditioning=none|class_labels``).

A conditioner turns a batch into the network's extra keyword arguments, and says what to condition
on when sampling: ``(cond, uncond)`` where ``uncond`` is the unconditional half of classifier-free
guidance (None: no guidance). Text conditioning (CLIP, SDXL's two encoders) lives in
``components/text.py`` and is used by the text-to-image families.
"""

from __future__ import annotations

import torch

from diffusion_lab.diffusion.sampling import class_labels
from diffusion_lab.utils.errors import ConfigError


class Unconditional:
    """No conditioning: the network sees only ``x_t`` and ``t``."""

    def __call__(self, batch: dict, train: bool) -> dict[str, torch.Tensor]:
        return {}

    def sampling(self, cond_batch: dict | None, n: int, device) -> tuple[dict, dict | None]:
        return {}, None


class ClassLabels:
    """Class-conditional: ``class_labels`` from the batch's ``label`` (the UNet needs
    ``num_class_embeds``); sampling takes ``cond_batch["label"]`` or the classes 0..K-1 in turn.

    Args:
        num_classes: the UNet's ``num_class_embeds`` (linked by interpolation in the config).
        null_class: the network's unconditional label, the ``uncond`` half of classifier-free
            guidance (a DiT's null row, which it trains by dropping labels itself:
            ``components/backbones.py``); None: the network has none, sampling is unguided.
    """

    def __init__(self, num_classes: int | None, null_class: int | None = None) -> None:
        if not num_classes:
            raise ConfigError(
                "conditioning=class_labels needs a UNet with class embeddings: set backbone.num_class_embeds "
                "(e.g. 10 for digits), or use conditioning=none."
            )
        self.num_classes = int(num_classes)
        self.null_class = null_class

    def __call__(self, batch: dict, train: bool) -> dict[str, torch.Tensor]:
        return {"class_labels": batch["label"]}

    def sampling(self, cond_batch: dict | None, n: int, device) -> tuple[dict, dict | None]:
        labels = cond_batch["label"] if cond_batch and "label" in cond_batch else class_labels(0, n, self.num_classes)
        labels = torch.as_tensor(labels).to(device)
        uncond = None if self.null_class is None else {"class_labels": torch.full_like(labels, self.null_class)}
        return {"class_labels": labels}, uncond
