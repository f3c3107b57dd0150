"""Checks every family's tests make of a full fine-tune's export (tests/test_family_*.py)."""

from __future__ import annotations

import numpy as np
import torch


def assert_exported_like_the_module(pipe, base, generate, own: np.ndarray, frozen=("text_encoder", "vae"), atol: float = 1e-5) -> None:
    """The exported pipeline's backbone trained, its frozen parts are the base's, and it samples what the
    module's own sampler does (``own``) and not what the base does."""
    backbone = "transformer" if hasattr(pipe, "transformer") else "unet"
    assert any(not torch.equal(a, b) for a, b in zip(getattr(pipe, backbone).parameters(), getattr(base, backbone).parameters()))
    for name in frozen:  # frozen parts exported unchanged
        assert all(torch.equal(a, b) for a, b in zip(getattr(pipe, name).parameters(), getattr(base, name).parameters())), name
    image = generate(pipe)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all() and np.abs(image - generate(base)).max() > 1e-3
    np.testing.assert_allclose(image, own, atol=atol)
