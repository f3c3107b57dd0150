"""Any image scorer saved in a local folder as a reward (``reward=local``): a transformers
image-classification / regression model (an aesthetic predictor, a quality or PickScore-style
head fine-tuned as ``AutoModelForImageClassification``); the score is one chosen logit."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import torch

from diffusion_lab.metrics.features import to_uint8_rgb
from diffusion_lab.rewards.base import Reward
from diffusion_lab.utils.errors import ConfigError


class LocalScorer(Reward):
    """``logits[:, label]`` (``activation=softmax``: its probability) of the model in ``path``.

    Args:
        path: ``reward.path``: a folder saved with ``save_pretrained`` (model + image processor).
        label: which output: an index, or a name from the model's ``id2label``; 0 for a one-output regressor.
        activation: none (the raw logit, e.g. an aesthetic score) | softmax | sigmoid.
    """

    name = "local"

    def __init__(self, path: str, label: int | str = 0, activation: Literal["none", "softmax", "sigmoid"] = "none") -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        folder = Path(str(path or "")).expanduser()
        if not path or not (folder / "config.json").is_file():
            raise ConfigError(
                f"reward.path={path!r} is not a saved scorer folder (no config.json there). Give a folder written by "
                f"a transformers image-classification model's save_pretrained and its image processor's save_pretrained."
            )
        try:
            self.model = AutoModelForImageClassification.from_pretrained(str(folder), local_files_only=True).eval().requires_grad_(False)
            self.processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"reward.path={path!r}: cannot load an image-classification model + image processor ({type(e).__name__}: {e}).") from e
        if activation not in ("none", "softmax", "sigmoid"):
            raise ConfigError(f"reward.activation={activation!r}: choose none, softmax or sigmoid.")
        names = {str(v): int(k) for k, v in (self.model.config.id2label or {}).items()}
        if isinstance(label, str) and not label.isdigit():
            if label not in names:
                raise ConfigError(f"reward.label={label!r} is not one of the scorer's labels {sorted(names)}; give a name or an index.")
            label = names[label]
        self.label = int(label)
        if not 0 <= self.label < self.model.config.num_labels:
            raise ConfigError(f"reward.label={self.label}: the scorer at {path} has {self.model.config.num_labels} outputs.")
        self.activation = activation

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        device = next(self.model.parameters()).device
        inputs = self.processor(images=list(to_uint8_rgb(images).cpu()), return_tensors="pt").to(device)
        logits = self.model(**inputs).logits.float()
        if self.activation == "softmax":
            logits = logits.softmax(-1)
        elif self.activation == "sigmoid":
            logits = logits.sigmoid()
        return logits[:, self.label]
