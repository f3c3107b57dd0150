"""CLIP score (Hessel et al. 2021): 100 * cos(image embedding, text embedding), via torchmetrics,
with a CLIP model read from a local folder."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchmetrics.multimodal.clip_score import CLIPScore

from diffusion_lab.metrics.features import load_clip, to_uint8_rgb


class _TensorCLIP(nn.Module):
    """A ``CLIPModel`` whose ``get_*_features`` return tensors: transformers >= 5 returns a
    ``ModelOutput`` (embedding in ``pooler_output``), torchmetrics expects the tensor."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        out = self.model.get_image_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        out = self.model.get_text_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)


def clip_metric(model_dir: str, local_files_only: bool = True) -> CLIPScore:
    """A torchmetrics ``CLIPScore`` on the CLIP model in ``model_dir`` (no download)."""
    model, processor = load_clip(model_dir, local_files_only)
    return CLIPScore(model_name_or_path=lambda: (_TensorCLIP(model), processor))


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: Sequence[str], model_dir: str | None = None, metric: CLIPScore | None = None, batch_size: int = 64) -> float:
    """Mean CLIP score of ``images`` ``[N, C, H, W]`` in [-1, 1] against their ``prompts`` (N strings)."""
    if len(images) != len(prompts):
        raise ValueError(f"clip_score needs one prompt per image; got {len(images)} images and {len(prompts)} prompts")
    metric = metric or clip_metric(model_dir)
    for i in range(0, len(images), batch_size):
        metric.update(to_uint8_rgb(images[i : i + batch_size]), list(prompts[i : i + batch_size]))
    return float(metric.compute())
