"""Conditioning images for ControlNet computed from the training image itself (``data.control``).

    edges     Canny edges of the image (the "canny" ControlNet): outlines of every stroke
    strokes   the binarised ink thinned to one-pixel lines (skeletonize): a digit's pen path
    mask      the binarised ink itself (a silhouette / "scribble"-like map)

Each map is a binary image, ink = 1, as a ``[C, H, W]`` tensor in [-1, 1] with the image's
channels: the range and layout of ``pixel_values`` and of a ``conditioning_image`` file loaded by
``ImageFolderDataset(paired_images=...)``, so computed and file controls reach the model alike
(the families' ``control_input`` maps them to [0, 1], what ``ControlNetModel`` was trained on in
diffusers' ``train_controlnet.py`` and what ``StableDiffusionControlNetPipeline`` feeds it).
The maps come from scikit-image (``feature.canny``, ``morphology.skeletonize``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from diffusion_lab.utils.errors import ConfigError

ControlKind = Literal["edges", "strokes", "mask"]
CONTROL_KINDS: tuple[str, ...] = ("edges", "strokes", "mask")
CONTROL_KEY = "conditioning_pixel_values"  # the batch key of control images (diffusers' train_controlnet.py)


def check_control_kind(kind: str) -> None:
    if kind not in CONTROL_KINDS:
        raise ConfigError(
            f"data.control={kind!r} is not a control map; use one of {', '.join(CONTROL_KINDS)} (computed from each "
            f"image), or null with data=image_folder and a 'conditioning_image' metadata column (data.paired_images)."
        )


def ink(grey: np.ndarray) -> np.ndarray:
    """``[H, W]`` grey in [0, 1] -> boolean ink mask ``[H, W]``: Otsu's threshold, with the minority
    side as ink (light strokes on dark paper, as the digits, or dark on light)."""
    from skimage.filters import threshold_otsu

    if grey.max() - grey.min() < 1e-6:
        return np.zeros_like(grey, dtype=bool)
    mask = grey > threshold_otsu(grey)
    return mask if mask.mean() <= 0.5 else ~mask


def control_map(grey: np.ndarray, kind: ControlKind, sigma: float = 1.0) -> np.ndarray:
    """``[H, W]`` grey in [0, 1] -> boolean map ``[H, W]`` (True = drawn). ``sigma``: Canny's
    Gaussian (pixels), for ``edges``."""
    if kind == "edges":
        from skimage.feature import canny

        return canny(grey, sigma=sigma)
    if kind == "strokes":
        from skimage.morphology import skeletonize

        return skeletonize(ink(grey))
    if kind == "mask":
        return ink(grey)
    check_control_kind(kind)
    raise AssertionError("unreachable")


def control_image(pixel_values: torch.Tensor, kind: ControlKind, sigma: float = 1.0) -> torch.Tensor:
    """An image ``[C, H, W]`` in [-1, 1] -> its control map ``[C, H, W]`` in {-1, 1} (the map in
    every channel, so it has the image's layout)."""
    grey = (pixel_values.float().mean(0).numpy() + 1.0) / 2.0
    drawn = torch.from_numpy(control_map(grey, kind, sigma).astype(np.float32))
    return (drawn * 2.0 - 1.0).expand_as(pixel_values).contiguous()


def _paired_images(dataset: Dataset) -> dict[str, str]:
    """``paired_images`` (column -> batch key) of the ``ImageFolderDataset`` under ``dataset``
    (through ``Subset``s and other wrappers with a ``dataset``), else {}."""
    while dataset is not None:
        if hasattr(dataset, "paired_images"):
            return dict(dataset.paired_images or {})
        dataset = getattr(dataset, "dataset", None)
    return {}


class ControlMaps(Dataset):
    """``dataset``'s items plus ``conditioning_pixel_values``: the ``kind`` map of each item's
    ``pixel_values`` (``control_image``), computed when the item is loaded (in the loader's
    workers; once with ``model.cache=true``, whose cache carries it along)."""

    def __init__(self, dataset: Dataset, kind: ControlKind, sigma: float = 1.0) -> None:
        check_control_kind(kind)
        columns = [c for c, key in _paired_images(dataset).items() if key == CONTROL_KEY]
        if columns:  # the computed map would silently replace the user's files
            raise ConfigError(
                f"data.control={kind} computes {CONTROL_KEY} from each image, and data.paired_images reads {CONTROL_KEY} "
                f"from the metadata column {columns[0]!r}: two sources for one control image. To train on your files add "
                f"data.control=null; to train on computed {kind} maps drop data.paired_images."
            )
        self.dataset = dataset
        self.kind = kind
        self.sigma = sigma

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i) -> dict:
        item = dict(self.dataset[i])
        item[CONTROL_KEY] = control_image(item["pixel_values"], self.kind, self.sigma)
        return item
