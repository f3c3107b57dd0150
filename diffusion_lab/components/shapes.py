"""Shapes read from the parts' own configs: one home for each formula."""

from __future__ import annotations

from typing import Sequence


def sample_size(config) -> int:
    """Side of a (square) UNet/VAE ``sample_size``, an int or ``[H, W]`` in diffusers configs."""
    size = config.sample_size
    return int(size if isinstance(size, int) else size[0])


def downsample_factor(block_out_channels: Sequence[int]) -> int:
    """Pixels per latent along each side of a diffusers ``AutoencoderKL``: every down block but the
    last halves the image (8 for SD's four blocks)."""
    return 2 ** (len(block_out_channels) - 1)
