"""torchmetrics internals, checked against 1.9.0. When one breaks, ``tests/test_compat.py`` says which."""

from __future__ import annotations

import torch


def clip_scores_per_image(images_uint8: torch.Tensor, prompts: list[str], model, processor) -> torch.Tensor:
    """``[N]`` CLIP scores ``100 cos(image, text)`` of uint8 images ``[N, 3, H, W]`` against ``prompts``:
    torchmetrics' own update function ``torchmetrics.functional.multimodal.clip_score._clip_score_update``
    (1.9.0; ``CLIPScore`` keeps only the sum and clamps at 0). ``model`` must return tensors from
    ``get_image_features`` / ``get_text_features``. If it vanishes, compute the normalised embeddings' dot
    product x 100 here."""
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    scores, _ = _clip_score_update(list(images_uint8), prompts, model, processor)
    return scores
