"""A digit classifier trained on scikit-learn's digits: offline scoring for digits runs.

    clf = DigitClassifier.load_or_train()          # trains once (~20 s on CPU), then cached
    clf.predict_proba(images)                      # [N, 1, H, W] in [-1, 1] -> [N, 10]
    clf.features(images)                           # [N, 128]: FID/KID features for digits
    score_digit_samples(images, labels=None)       # class histogram, confidence, entropy, accuracy

Images at any resolution are brought back to 8x8 with PIL-compatible antialiased bicubic
resampling (the inverse of how ``DigitsDataset`` made them: PIL bicubic up from 8x8). The
classifier is trained on a fixed stratified split of the 1,797 digits, on real digits that went
through that same round trip at several resolutions, so its input path is the one samples take.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.data.digits import DIGIT_NAMES, DigitsDataset
from diffusion_lab.data.transforms import ImageTransform
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.io import atomic_write_bytes

NUM_CLASSES = 10
DIGIT_SIZE = 8
HELDOUT_FRACTION = 0.25
SPLIT_SEED = 0
# Everything that changes the trained weights: a cached file made with another recipe is retrained.
RECIPE = {
    "version": 3,
    "hidden": 128,
    "epochs": 30,
    "batch_size": 64,
    "lr": 3e-3,
    "train_resolutions": [8, 16],
    "heldout_fraction": HELDOUT_FRACTION,
    "split_seed": SPLIT_SEED,
    "seed": 0,
}


def default_cache_dir() -> Path:
    """``$DIFFUSION_LAB_CACHE`` or ``~/.cache/diffusion_lab``."""
    return Path(os.environ.get("DIFFUSION_LAB_CACHE", Path.home() / ".cache" / "diffusion_lab")).expanduser()


def digit_split() -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices) into ``load_digits()``: fixed, stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    idx = np.arange(len(labels))
    train, heldout = train_test_split(idx, test_size=HELDOUT_FRACTION, random_state=SPLIT_SEED, stratify=labels)
    return np.sort(train), np.sort(heldout)


def real_digits(split: str = "heldout", resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Real digits made exactly as ``DigitsDataset`` makes training images.

    Returns ``([N, 1, resolution, resolution]`` in [-1, 1], labels ``[N]``). ``split``:
    ``train`` | ``heldout`` (the classifier's split) | ``all``.
    """
    ds = DigitsDataset(ImageTransform(resolution, mode="L", warn_upscale=False))
    train, heldout = digit_split()
    idx = {"train": train, "heldout": heldout, "all": np.arange(len(ds))}[split]
    images = torch.stack([ds[int(i)]["pixel_values"] for i in idx])
    return images, torch.as_tensor(ds.labels[idx])


def to_digit_size(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` in [-1, 1] -> ``[N, 1, 8, 8]`` in [-1, 1]: grey (channel mean), then
    antialiased bicubic (PIL-compatible) resampling to 8x8."""
    if images.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W]; got shape {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] != 1:
        x = x.mean(1, keepdim=True)
    if x.shape[-2:] != (DIGIT_SIZE, DIGIT_SIZE):
        x = F.interpolate(x, size=(DIGIT_SIZE, DIGIT_SIZE), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(-1, 1)


class DigitClassifier(nn.Module):
    """Small CNN on 8x8 digits. ``features`` is the penultimate layer (``num_features`` = 128),
    used as the FID/KID feature space for digits; ``forward`` gives logits ``[N, 10]``."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8 -> 4
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, hidden), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(hidden, NUM_CLASSES)
        self.num_features = hidden
        self.heldout_accuracy: float | None = None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` in [-1, 1] (any H, W) -> ``[N, 128]``."""
        return self.body(to_digit_size(images).to(self.head.weight.device))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` in [-1, 1] -> logits ``[N, 10]``."""
        return self.head(self.features(images))

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """``[N, C, H, W]`` in [-1, 1] -> class probabilities ``[N, 10]`` (on CPU)."""
        was_training = self.training
        self.eval()
        out = torch.cat([self(images[i : i + batch_size]).softmax(-1).cpu() for i in range(0, len(images), batch_size)])
        self.train(was_training)
        return out

    # ---- training and cache -----------------------------------------------------------------
    @classmethod
    def train_new(cls, verbose: bool = True) -> "DigitClassifier":
        """Train on the fixed train split (deterministic, CPU, seconds) and measure held-out accuracy."""
        r = RECIPE
        g = torch.Generator().manual_seed(r["seed"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(r["seed"])
            model = cls(hidden=r["hidden"])
        # every training image through the same round trip samples take: PIL bicubic up, our resize down
        xs, ys = [], []
        for res in r["train_resolutions"]:
            images, labels = real_digits("train", res)
            xs.append(to_digit_size(images))
            ys.append(labels)
        x, y = torch.cat(xs), torch.cat(ys)
        opt = torch.optim.Adam(model.parameters(), lr=r["lr"])
        steps_per_epoch = math.ceil(len(x) / r["batch_size"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["epochs"] * steps_per_epoch)
        model.train()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny batches: one thread is ~10x faster than several fighting over cores
        try:
            _fit(model, x, y, opt, sched, g, r["epochs"], r["batch_size"])
        finally:
            torch.set_num_threads(threads)
        model.eval()
        images, labels = real_digits("heldout", 16)
        model.heldout_accuracy = float((model.predict_proba(images).argmax(-1) == labels).float().mean())
        if verbose:
            print(f"digit classifier: held-out accuracy {model.heldout_accuracy:.4f} on {len(labels)} real digits")
        return model

    @classmethod
    def load_or_train(cls, cache_dir: str | os.PathLike | None = None, retrain: bool = False, verbose: bool = True) -> "DigitClassifier":
        """The cached classifier from ``cache_dir`` (default ``default_cache_dir()``), trained and
        cached on first use or when the recipe changed. Returned in eval mode."""
        path = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        path = path / f"digit_classifier_{_recipe_hash()}.pt"
        if path.exists() and not retrain:
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                model = cls(hidden=RECIPE["hidden"])
                model.load_state_dict(blob["state_dict"])
                model.heldout_accuracy = float(blob["heldout_accuracy"])
                return model.eval()
            except Exception as e:  # a truncated or foreign file: say so and retrain over it
                if verbose:
                    print(f"digit classifier cache {path} unreadable ({type(e).__name__}); retraining")
        model = cls.train_new(verbose=verbose)
        buf = io.BytesIO()
        torch.save({"state_dict": model.state_dict(), "heldout_accuracy": model.heldout_accuracy, "recipe": RECIPE}, buf)
        try:
            atomic_write_bytes(path, buf.getvalue())
        except OSError as e:
            raise ConfigError(f"cannot write the digit classifier cache {path}: {e}. Set DIFFUSION_LAB_CACHE to a writable folder.") from e
        return model.eval()


def _fit(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor, opt, sched, g: torch.Generator, epochs: int, batch_size: int) -> None:
    """Plain cross-entropy training on ``x`` ``[N, 1, 8, 8]``, labels ``y`` ``[N]``."""
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            b = perm[i : i + batch_size]
            xb = _shift(x[b], g)  # +-1 px translation: digits are not always centred
            loss = F.cross_entropy(model.head(model.body(xb)), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


def _recipe_hash() -> str:
    return hashlib.sha1(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:10]


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Translate each ``[1, 8, 8]`` image by a random -1..1 px in x and y (background = -1)."""
    n = len(x)
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(DIGIT_SIZE))[:, :, None].expand(n, DIGIT_SIZE, DIGIT_SIZE)
    cols = (dx[:, None] + torch.arange(DIGIT_SIZE))[:, None, :].expand(n, DIGIT_SIZE, DIGIT_SIZE)
    return pad[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


# ---- scores ---------------------------------------------------------------------------------
def class_scores(probs: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """Scores from class probabilities ``[N, K]``.

    ``class_histogram``: predicted-class counts; ``confidence``: mean max-probability;
    ``marginal_entropy``: entropy (nats) of the mean predicted distribution (``log K`` = every
    class equally often, 0 = mode collapse); ``accuracy`` when ``labels`` ``[N]`` are given.
    """
    pred = probs.argmax(-1)
    marginal = probs.mean(0)
    out = {
        "n": int(len(probs)),
        "class_histogram": torch.bincount(pred, minlength=probs.shape[-1]).tolist(),
        "confidence": float(probs.max(-1).values.mean()),
        "marginal_entropy": float(-(marginal * marginal.clamp_min(1e-12).log()).sum()),
        "max_entropy": math.log(probs.shape[-1]),
    }
    if labels is not None:
        out["accuracy"] = float((pred == torch.as_tensor(labels).cpu()).float().mean())
    return out


def score_digit_samples(
    images: torch.Tensor,
    labels: torch.Tensor | Sequence[int] | None = None,
    classifier: DigitClassifier | None = None,
    reference: bool = True,
) -> dict:
    """Digit scores of generated ``images`` ``[N, C, H, W]`` in [-1, 1] (any resolution), and
    (``reference``) the same numbers for the held-out real digits at the same resolution under
    ``"real_heldout"``, so a reader sees what "good" looks like. ``labels``: the class each
    image was asked to be (class-conditional / prompted runs) -> ``accuracy``."""
    classifier = classifier or DigitClassifier.load_or_train()
    out = class_scores(classifier.predict_proba(images), None if labels is None else torch.as_tensor(labels))
    if reference:
        real, real_labels = real_digits("heldout", images.shape[-1])
        out["real_heldout"] = class_scores(classifier.predict_proba(real), real_labels)
    return out


def labels_from_captions(captions: Sequence[str], template: str = "a handwritten digit {name}") -> list[int]:
    """Invert a ``DigitsDataset`` caption template: "a handwritten digit seven" -> 7."""
    table = {template.format(name=name, digit=d): d for d, name in enumerate(DIGIT_NAMES)}
    missing = sorted({c for c in captions if c not in table})
    if missing:
        raise ConfigError(
            f"cannot read a digit class from caption(s) {missing[:3]}: they do not match the template "
            f"{template!r} (e.g. {template.format(name='seven', digit=7)!r}). Set the caption template the model was trained with."
        )
    return [table[c] for c in captions]
