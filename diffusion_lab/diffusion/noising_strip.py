"""The forward process as a picture: each image noised to a row of levels of its schedule (a PIL
image, saved as PNG by ``diffusion_lab.noising`` and the noising-strip callback)."""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw

from diffusion_lab.data.transforms import to_pil


@torch.no_grad()
def noising_strip(x0: torch.Tensor, process, levels: Sequence[float], seed: int = 0, cell: int = 80, decode=None) -> Image.Image:
    """Forward process of ``process`` for each image (rows) at each ``level`` of its schedule
    (columns; 0 = clean, 1 = the noisiest training level), labelled with the level and SNR.

    Uses the process's own noising (``Process.at_level``) with one fixed noise draw per image, so a
    row shows the same noise growing. ``x0``: ``[N, C, H, W]``, images in [-1, 1] or, for a latent
    model, latents with ``decode`` mapping them to images (the noise is added in latent space,
    where the model sees it).
    """
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    decode = decode or (lambda x: x)
    cols, snrs = [], []
    for level in levels:
        x, snr = process.at_level(x0.float(), noise, float(level))
        cols.append(decode(x).clamp(-1, 1))
        snrs.append(snr)
    # [T, N, ...] -> row-major over images: image i, all levels
    ordered = torch.stack(cols, 1).flatten(0, 1)
    pils = [p.convert("RGB").resize((cell, cell), Image.NEAREST) for p in to_pil(ordered)]
    grid = make_image_grid(pils, rows=x0.shape[0], cols=len(levels))
    header = 28
    canvas = Image.new("RGB", (grid.width, grid.height + header), "white")
    canvas.paste(grid, (0, header))
    draw = ImageDraw.Draw(canvas)
    for j, (level, snr) in enumerate(zip(levels, snrs)):
        label = f"t={round(level * (process.num_train_timesteps - 1))}" if process.kind == "vp" else f"{float(level):.2f}"
        draw.text((j * cell + 4, 2), label, fill="black")
        draw.text((j * cell + 4, 14), f"SNR={snr:.2g}", fill="black")
    return canvas
