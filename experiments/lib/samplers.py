"""Quality versus cost of samplers on one trained network: every sampler starts from the same x_T.

``compare_samplers`` draws ``num_images`` samples per (sampler, steps) setting from one fixed
noise tensor, counts the network evaluations (NFE: Heun and DPM-Solver's first steps differ from
"steps"), times them, and scores them against precomputed reference features. Samplers are the
``conf/sampler`` options, so a setting runs whatever process the model was trained with.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from tqdm.auto import tqdm

from diffusion_lab.components.shapes import sample_size
from diffusion_lab.diffusion.sampling import load_sampler, sample_batches
from diffusion_lab.metrics.distribution import distribution_metrics
from diffusion_lab.metrics.features import FeatureExtractor

# (sampler, inference steps): the sampler study on a vp model
DEFAULT_SETTINGS: tuple[tuple[str, int], ...] = (
    ("ddpm", 1000),
    ("ddim", 50),
    ("ddim", 20),
    ("dpmpp", 20),
    ("dpmpp", 10),
    ("euler", 50),
    ("heun", 25),
)


@torch.no_grad()
def draw(unet, base_scheduler, name: str, steps: int, noise: torch.Tensor, batch_size: int = 250, seed: int = 0, device: torch.device | str = "cpu") -> tuple[torch.Tensor, int, float]:
    """Samples ``[N, C, H, W]`` in [-1, 1] from x_T = ``noise`` with sampler ``name`` at ``steps``
    on the schedule of ``base_scheduler`` (the pipeline's); returns (images, network evaluations
    per image, seconds)."""
    sampler = load_sampler(name)
    calls = 0

    def denoise(x, t, **cond):
        nonlocal calls
        calls += 1
        return unet(x, t, **cond).sample

    n_batches = (len(noise) + batch_size - 1) // batch_size
    t0 = time.perf_counter()
    images = sample_batches(
        denoise, lambda: sampler.scheduler(base_scheduler), tuple(noise.shape[1:]), len(noise), batch_size, steps,
        seed=seed, device=device, num_classes=unet.config.num_class_embeds, noise=noise, progress=False,
    )
    return images, calls // n_batches, time.perf_counter() - t0


def compare_samplers(
    unet,
    base_scheduler,
    real_features: torch.Tensor,
    extractor: FeatureExtractor,
    settings: Sequence[tuple[str, int]] = DEFAULT_SETTINGS,
    num_images: int = 500,
    batch_size: int = 250,
    seed: int = 0,
    device: torch.device | str = "cpu",
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """One row per setting: ``sampler``, ``steps``, ``nfe``, ``seconds``, ``seconds_per_image``,
    ``fid``, ``kid_mean``, ``kid_std`` (+ ``is_mean``/``is_std`` with a classifier extractor);
    and the images per setting (``"ddim-20"`` -> ``[N, C, H, W]``)."""
    size = sample_size(unet.config)
    noise = torch.randn((num_images, unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(seed))
    rows, images = [], {}
    for name, steps in tqdm(list(settings), desc="samplers"):
        x, nfe, seconds = draw(unet, base_scheduler, name, steps, noise, batch_size, seed, device)
        feats, logits = extractor.extract(x, desc=f"{name}-{steps} features")
        metrics = distribution_metrics(real_features, feats, logits, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
        rows.append({"sampler": name, "steps": steps, "nfe": nfe, "seconds": round(seconds, 3), "seconds_per_image": seconds / num_images, **metrics})
        images[f"{name}-{steps}"] = x
    return rows, images
