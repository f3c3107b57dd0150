"""CLIP score as a reward (``reward=clip_score``): torchmetrics' per-image CLIP score."""

from __future__ import annotations

from typing import Sequence

import torch

from diffusion_lab.compat.torchmetrics import clip_scores_per_image
from diffusion_lab.metrics.clip import _TensorCLIP
from diffusion_lab.metrics.features import load_clip, to_uint8_rgb
from diffusion_lab.rewards.base import Reward
from diffusion_lab.utils.errors import ConfigError


def per_image_clip_scores(images_uint8: torch.Tensor, prompts: list[str], model, processor) -> torch.Tensor:
    """``[N]`` CLIP scores ``100 cos(image, text)``: torchmetrics' own update function (``CLIPScore``
    keeps only their sum, and clamps the mean at 0; a reward keeps negative scores, which still rank):
    ``compat.torchmetrics.clip_scores_per_image``."""
    return clip_scores_per_image(images_uint8, prompts, model, processor)


class CLIPScoreReward(Reward):
    """CLIP score of each image against its prompt (Hessel et al. 2021), with the CLIP model in
    ``model`` (a local folder, or a hub id when ``local_files_only`` is false).

    Args:
        model: ``reward.model``: CLIPModel + CLIPProcessor folder / hub id.
        local_files_only: never download.
        scale: the score is divided by this (CLIP scores are ~0-40; GRPO's advantages are normalised
            per group anyway, so it only changes what is logged).
    """

    name = "clip_score"

    def __init__(self, model: str, local_files_only: bool = True, scale: float = 1.0) -> None:
        if not model:
            raise ConfigError("reward=clip_score needs reward.model: a CLIP folder (CLIPModel + CLIPProcessor save_pretrained) or hub id.")
        try:
            clip, self.processor = load_clip(model, local_files_only)
        except ConfigError as e:
            raise ConfigError(f"reward.model={model!r}: {e}") from e
        self.model = _TensorCLIP(clip)
        self.scale = scale

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        if prompts is None:
            raise ConfigError("reward=clip_score scores images against prompts, but this model is unconditional (no captions); use reward=digit_classifier or reward=local.")
        device = next(self.model.parameters()).device
        scores = per_image_clip_scores(to_uint8_rgb(images).to(device), list(prompts), self.model, self.processor)
        return scores.float() / self.scale
