"""Feature extractors for FID / KID / IS: swap the network, keep the metric.

Each extractor maps images ``[N, C, H, W]`` in [-1, 1] (any size, 1 or 3 channels) to features
``[N, num_features]`` and, where it is a classifier, to logits ``[N, K]`` (for the Inception Score).

- ``DigitFeatures``: the digit classifier trained here on scikit-learn digits (offline, CPU).
- ``InceptionFeatures``: torchmetrics' FID InceptionV3 (torch-fidelity weights), when its
  weights file is on disk; otherwise a ``ConfigError`` that says which file goes where.
- ``ClipFeatures``: CLIP image embeddings from a local CLIP model folder (FD in CLIP space).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from diffusion_lab.data.transforms import to_uint8
from diffusion_lab.metrics.digits import DigitClassifier
from diffusion_lab.utils.errors import ConfigError

# torch-fidelity's FID InceptionV3 (the TF-FID port torchmetrics uses) and where torch.hub
# (torch_fidelity.feature_extractor_inceptionv3 -> load_state_dict_from_url) looks for it.
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """``[N, 1|3, H, W]`` in [-1, 1] -> ``[N, 3, H, W]`` uint8 in [0, 255]."""
    x = to_uint8(images)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class FeatureExtractor(nn.Module):
    """Base: ``forward(images) -> [N, num_features]``; ``logits(images) -> [N, K]`` or None."""

    name: str = "features"
    num_features: int

    def logits(self, images: torch.Tensor) -> torch.Tensor | None:
        return None

    @property
    def has_logits(self) -> bool:
        return False

    @torch.no_grad()
    def extract(self, images: torch.Tensor, batch_size: int = 256, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features ``[N, D]``, logits ``[N, K]`` or None) on CPU, in batches with a progress bar."""
        device = next(self.parameters()).device
        feats, logits = [], []
        n_batches = (len(images) + batch_size - 1) // batch_size
        for i in tqdm(range(0, len(images), batch_size), desc=desc, total=n_batches, disable=n_batches <= 1, leave=False):
            x = images[i : i + batch_size].to(device)
            feats.append(self(x).double().cpu())
            if self.has_logits:
                logits.append(self.logits(x).double().cpu())
        return torch.cat(feats), (torch.cat(logits) if logits else None)


class DigitFeatures(FeatureExtractor):
    """Penultimate layer (128-d) and logits of the digit classifier (``DigitClassifier``)."""

    name = "digits"

    def __init__(self, classifier: DigitClassifier | None = None, cache_dir: str | None = None) -> None:
        super().__init__()
        self.classifier = (classifier or DigitClassifier.load_or_train(cache_dir)).eval().requires_grad_(False)
        self.num_features = self.classifier.num_features

    @property
    def has_logits(self) -> bool:
        return True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images)


def inception_weights_path(weights_path: str | None = None) -> Path:
    """Where the InceptionV3 weights are read from: ``weights_path`` or torch.hub's checkpoint dir."""
    if weights_path:
        return Path(weights_path).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


class InceptionFeatures(FeatureExtractor):
    """torchmetrics' ``NoTrainInceptionV3`` (pool3 2048-d features; ``logits_unbiased`` for IS).

    Never downloads: the weights must already be at ``weights_path`` or in torch.hub's cache,
    and torch-fidelity must be installed; otherwise a ``ConfigError`` says what to put where.
    """

    name = "inception"

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        path = inception_weights_path(weights_path)
        problems = []
        if not path.is_file():
            problems.append(
                f"the weights file {path} does not exist: download {INCEPTION_URL} on a machine with internet and copy it "
                f"there (or set features.weights_path=<file>; torch.hub's folder moves with $TORCH_HOME)"
            )
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            import torch_fidelity  # noqa: F401
        except Exception as e:  # ImportError, or torch-fidelity failing on a missing torchvision
            problems.append(f"torch-fidelity cannot be imported ({type(e).__name__}: {e}); `pip install torch-fidelity` (it needs torchvision)")
        if problems:
            raise ConfigError(
                "features=inception needs torchmetrics' InceptionV3, which is not usable offline here: "
                + "; and ".join(problems)
                + ". Or score with features=digits (digits runs) or features=clip features.model=<local CLIP folder>."
            )
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048", "logits_unbiased"], feature_extractor_weights_path=str(path))
        self.num_features = 2048

    @property
    def has_logits(self) -> bool:
        return True

    def _both(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool, logits = self.net(to_uint8_rgb(images))
        return pool.reshape(len(images), -1), logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._both(images)[0]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self._both(images)[1]


def load_clip(model_dir: str, local_files_only: bool = True):
    """(``CLIPModel``, ``CLIPProcessor``) from a local folder; a ``ConfigError`` names the folder
    when it is not a CLIP model (no download is ever attempted with ``local_files_only``)."""
    from transformers import CLIPModel, CLIPProcessor

    path = Path(model_dir).expanduser()
    if local_files_only and not path.is_dir():
        raise ConfigError(
            f"CLIP model folder {model_dir!r} does not exist. Give a folder saved with CLIPModel.save_pretrained + "
            f"CLIPProcessor.save_pretrained (e.g. a local copy of openai/clip-vit-base-patch32)."
        )
    try:
        model = CLIPModel.from_pretrained(str(path) if path.is_dir() else model_dir, local_files_only=local_files_only)
        processor = CLIPProcessor.from_pretrained(str(path) if path.is_dir() else model_dir, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"cannot load a CLIP model + processor from {model_dir!r} ({type(e).__name__}: {e}). The folder needs "
            f"config.json, model weights, the tokenizer files and processor_config.json / preprocessor_config.json."
        ) from e
    return model.eval().requires_grad_(False), processor


class ClipFeatures(FeatureExtractor):
    """CLIP image embeddings (after the projection) from a local CLIP folder; no logits (no IS)."""

    name = "clip"

    def __init__(self, model: str, local_files_only: bool = True) -> None:
        super().__init__()
        self.model, self.processor = load_clip(model, local_files_only)
        self.num_features = self.model.config.projection_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=list(to_uint8_rgb(images).cpu()), return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels.to(self.model.device))
        return getattr(out, "pooler_output", out)  # transformers >= 5 returns a ModelOutput


__all__ = ["ClipFeatures", "DigitFeatures", "FeatureExtractor", "InceptionFeatures", "inception_weights_path", "load_clip", "to_uint8_rgb"]
