"""How good a digits model is, in three numbers: FID in the digit classifier's features against all
1,797 real digits, the classifier's mean confidence, and (class-conditional models) how often the
generated digit is the one asked for. What the reference-run ladder's bands and the backbone
comparison score (``experiments/ladder``, ``experiments/backbones``)."""

from __future__ import annotations

import torch

from diffusion_lab.diffusion.sampling import Sampler
from diffusion_lab.inference.generate import ModuleModel, generate_images
from diffusion_lab.metrics.digits import real_digits, score_digit_samples
from diffusion_lab.metrics.distribution import fid
from diffusion_lab.metrics.features import DigitFeatures


@torch.no_grad()
def digit_quality(
    module,
    num_images: int = 500,
    num_inference_steps: int = 20,
    sampler: Sampler | None = None,
    seed: int = 0,
    guidance_scale: float = 1.0,
    batch_size: int = 250,
    extractor: DigitFeatures | None = None,
) -> tuple[dict, torch.Tensor]:
    """Scores of ``num_images`` samples of a trained ``DiffusionModule`` (its current weights: wrap
    in the EMA scope for EMA ones) drawn with ``sampler`` (None: the configured one) from one seeded
    generator; class-conditional models are asked for the classes 0..K-1 in turn, with
    ``guidance_scale`` where the network has a null label. Returns (``{"fid", "confidence",
    "accuracy" (class-conditional only), "class_histogram"}``, images ``[N, C, H, W]`` in [-1, 1])."""
    extractor = extractor or DigitFeatures()
    drawn = generate_images(ModuleModel(module, sampler), num_images, batch_size, num_inference_steps, seed, guidance_scale=guidance_scale)
    images = drawn.images
    real, _ = real_digits("all", images.shape[-1])
    real_features, _ = extractor.extract(real, desc="real digit features")
    fake_features, _ = extractor.extract(images, desc="sample features")
    scores = score_digit_samples(images, labels=drawn.labels, classifier=extractor.classifier, reference=False)
    out = {"fid": fid(real_features, fake_features), "confidence": scores["confidence"], "class_histogram": scores["class_histogram"]}
    if "accuracy" in scores:
        out["accuracy"] = scores["accuracy"]
    return out, images
