"""scikit-learn's bundled handwritten digits (``data=digits``, ``digits_captioned``, ``digits_concept``):
real captioned images that need no download. Items: ``pixel_values`` ``[C, H, W]`` in [-1, 1],
``label`` (int) and ``caption`` (str)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from diffusion_lab.data.transforms import ImageTransform

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class DigitsDataset(Dataset):
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 16 grey levels), resized to
    the transform's resolution. Real data that needs no download. Captions follow
    ``caption_template`` (``{name}`` = "seven", ``{digit}`` = 7). ``thicken`` draws every stroke
    one pixel bolder (a 2x2 grey dilation of the 8x8 image), ``invert`` swaps ink and paper:
    concepts for LoRA experiments."""

    def __init__(self, transform: ImageTransform, caption_template: str = "a handwritten digit {name}", invert: bool = False, thicken: bool = False) -> None:
        from scipy.ndimage import grey_dilation
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
        if thicken:
            images = np.stack([grey_dilation(im, size=(2, 2)) for im in images])
        if invert:
            images = 255 - images
        self.images = images
        self.labels = digits.target.astype(np.int64)
        self.transform = transform
        self.caption_template = caption_template

    def __len__(self) -> int:
        return len(self.labels)

    def caption(self, label: int) -> str:
        return self.caption_template.format(name=DIGIT_NAMES[label], digit=label)

    def __getitem__(self, i: int) -> dict:
        label = int(self.labels[i])
        return {
            "pixel_values": self.transform(Image.fromarray(self.images[i], "L")),
            "label": label,
            "caption": self.caption(label),
        }
