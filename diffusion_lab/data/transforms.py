"""Image transforms without torchvision: resize, crop, flip, scale to [-1, 1]; and back, from
[-1, 1] to uint8, PIL images and one grid image."""

from __future__ import annotations

import math
import random
import warnings
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from diffusion_lab.utils.errors import ConfigError


class ImageTransform:
    """PIL image -> float tensor ``[C, H, W]`` in [-1, 1].

    Resizes the shorter side to ``resolution`` (bicubic), then crops ``resolution`` square
    (center or random) and optionally flips horizontally with probability 0.5.
    """

    def __init__(
        self,
        resolution: int,
        crop: Literal["center", "random"] = "center",
        random_flip: bool = False,
        mode: Literal["RGB", "L"] = "RGB",
        warn_upscale: bool = True,
    ) -> None:
        if crop not in ("center", "random"):
            raise ConfigError(f"data.crop must be 'center' or 'random'; got {crop!r}.")
        if mode not in ("RGB", "L"):
            raise ConfigError(f"the data transform's mode must be 'RGB' (3 channels) or 'L' (greyscale, 1 channel); got {mode!r}.")
        self.resolution = resolution
        self.crop = crop
        self.random_flip = random_flip
        self.mode = mode
        self.warn_upscale = warn_upscale
        self._warned = False

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng or random
        image = image.convert(self.mode)
        w, h = image.size
        r = self.resolution
        if min(w, h) < r and self.warn_upscale and not self._warned:
            warnings.warn(f"images smaller than data.resolution={r} (e.g. {w}x{h}) are upscaled; quality may suffer", stacklevel=2)
            self._warned = True
        scale = r / min(w, h)
        if (w, h) != (r, r):
            image = image.resize((max(r, round(w * scale)), max(r, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        if self.crop == "center":
            left, top = (w - r) // 2, (h - r) // 2
        else:
            left, top = rng.randint(0, w - r), rng.randint(0, h - r)
        image = image.crop((left, top, left + r, top + r))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        if arr.ndim == 2:
            arr = arr[None]
        else:
            arr = arr.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(arr))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255] (same shape): the one [-1, 1] -> pixels formula."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[N, C, H, W]`` in [-1, 1] -> list of PIL images (L for 1 channel, RGB for 3)."""
    arr = to_uint8(images).cpu().numpy()
    out = []
    for a in arr:
        out.append(Image.fromarray(a[0], "L") if a.shape[0] == 1 else Image.fromarray(a.transpose(1, 2, 0), "RGB"))
    return out


def image_grid(images: torch.Tensor, rows: int | None = None, upscale_to: int = 64, pad: int = 2) -> Image.Image:
    """``[N, C, H, W]`` in [-1, 1] -> one grid image (``make_image_grid``); tiny images are
    upscaled (nearest) to ``upscale_to`` px so an 8 px digit is visible, and each cell gets a
    ``pad`` px grey border so images that fill their frame stay apart."""
    from diffusers.utils import make_image_grid  # here: loading data does not import diffusers

    pils = to_pil(images)
    n = len(pils)
    rows = rows or max(1, int(math.sqrt(n)))
    cols = math.ceil(n / rows)
    pils += [Image.new(pils[0].mode, pils[0].size)] * (rows * cols - n)
    if pils[0].width < upscale_to:
        pils = [p.resize((upscale_to, upscale_to), Image.NEAREST) for p in pils]
    if pad:
        pils = [ImageOps.expand(p, border=pad, fill=128 if p.mode == "L" else (128, 128, 128)) for p in pils]
    return make_image_grid(pils, rows=rows, cols=cols)
