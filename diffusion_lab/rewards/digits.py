"""The project's digit classifier as a reward (``reward=digit_classifier``)."""

from __future__ import annotations

from typing import Sequence

import torch

from diffusion_lab.metrics.digits import DigitClassifier, labels_from_captions
from diffusion_lab.rewards.base import Reward


class DigitConfidence(Reward):
    """The classifier's probability of the prompted digit (captions as ``DigitsDataset`` writes them,
    "a handwritten digit seven"; ``caption_template``), or of its most likely digit when there are
    no prompts (unconditional models): ``max_k p(k | image)``.

    Args:
        caption_template: how captions name the digit (``metrics/digits.labels_from_captions``).
        cache_dir: where the classifier is cached (None: ``$DIFFUSION_LAB_CACHE``, trained on first use).
    """

    name = "digit_classifier"

    def __init__(self, caption_template: str = "a handwritten digit {name}", cache_dir: str | None = None) -> None:
        self.caption_template = caption_template
        self.classifier = DigitClassifier.load_or_train(cache_dir, verbose=False).requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        probs = self.classifier(images.to(self.classifier.head.weight.device)).softmax(-1)
        if prompts is None:
            return probs.max(-1).values
        labels = torch.as_tensor(labels_from_captions(list(prompts), self.caption_template), device=probs.device)
        return probs.gather(1, labels[:, None])[:, 0]
