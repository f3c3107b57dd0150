"""Image transforms without torchvision: resize, crop, flip, scale to [-1, 1] (one random draw,
applied alike to an image, its paired images and its loss mask); and back, from [-1, 1] to uint8,
PIL images and one grid image."""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from diffusion_lab.utils.errors import ConfigError


@dataclass(frozen=True)
class Geometry:
    """One draw of the geometric transform, in pixels and ``(h, w)`` order: the source's
    ``original_size``, the size it is resized to (``resized_size``), the ``crop_top_left`` of the
    crop (``(top, left)``, in the output's frame: mirrored when ``flip``), the output ``size``.
    Applying it to several images (image, conditioning image, mask) keeps them aligned."""

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    size: tuple[int, int]
    flip: bool

    @property
    def crop_box(self) -> tuple[int, int, int, int]:
        """PIL's (left, top, right, bottom) of the crop in the resized, unflipped image."""
        (top, left), (h, w), (_, rw) = self.crop_top_left, self.size, self.resized_size
        if self.flip:
            left = rw - left - w
        return left, top, left + w, top + h


class ImageTransform:
    """PIL image -> float tensor ``[C, H, W]`` in [-1, 1].

    Resizes (bicubic) so the image just covers the output size, then crops it (center or random)
    and optionally flips horizontally with probability 0.5. The output is ``resolution`` square,
    or the ``size`` ``(h, w)`` asked for (an aspect-ratio bucket). ``draw`` makes the random
    choices once (a ``Geometry``); ``apply`` / ``apply_mask`` run them on any image, so paired images
    and masks get exactly the main image's resize, crop and flip.
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

    def draw(self, image_size: tuple[int, int], rng: random.Random | None = None, size: tuple[int, int] | None = None) -> Geometry:
        """The geometry for a source of PIL ``image_size`` ``(w, h)`` and output ``size`` ``(h, w)``
        (default: ``resolution`` square). Draws from ``rng`` (default: Python's global RNG, which
        ``SeededItems`` seeds per item): crop left, crop top, then the flip."""
        rng = rng or random
        w, h = image_size
        th, tw = size or (self.resolution, self.resolution)
        scale = max(th / h, tw / w)
        if scale > 1 and self.warn_upscale and not self._warned:
            warnings.warn(f"images smaller than data.resolution={self.resolution} (e.g. {w}x{h}) are upscaled; quality may suffer", stacklevel=3)
            self._warned = True
        rw, rh = (w, h) if (w, h) == (tw, th) else (max(tw, round(w * scale)), max(th, round(h * scale)))
        if self.crop == "center":
            left, top = (rw - tw) // 2, (rh - th) // 2
        else:
            left, top = rng.randint(0, rw - tw), rng.randint(0, rh - th)
        flip = self.random_flip and rng.random() < 0.5
        if flip:
            left = rw - left - tw  # the crop as the flipped output sees it
        return Geometry((h, w), (rh, rw), (top, left), (th, tw), flip)

    def _geometric(self, image: Image.Image, g: Geometry, resample: int) -> Image.Image:
        (h, w), (rh, rw) = g.original_size, g.resized_size
        if image.size != (w, h):  # a paired image of another size: first brought to the main image's
            image = image.resize((w, h), resample)
        if (rw, rh) != (w, h):
            image = image.resize((rw, rh), resample)
        image = image.crop(g.crop_box)
        return image.transpose(Image.FLIP_LEFT_RIGHT) if g.flip else image

    def apply(self, image: Image.Image, geometry: Geometry) -> torch.Tensor:
        """``image`` through ``geometry`` -> ``[C, h, w]`` in [-1, 1] (``C`` from ``mode``)."""
        image = self._geometric(image.convert(self.mode), geometry, Image.BICUBIC)
        arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(arr))

    def apply_mask(self, mask: Image.Image, geometry: Geometry) -> torch.Tensor:
        """A loss mask (greyscale; white = train here) through ``geometry`` -> ``[1, h, w]`` in [0, 1]
        (bilinear, so it never overshoots [0, 1])."""
        mask = self._geometric(mask.convert("L"), geometry, Image.BILINEAR)
        return torch.from_numpy(np.asarray(mask, dtype=np.float32)[None] / 255.0)

    def __call__(self, image: Image.Image, rng: random.Random | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
        return self.apply(image, self.draw(image.size, rng, size))


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
