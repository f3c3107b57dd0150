"""Quality versus cost of samplers on one trained UNet: every sampler starts from the same x_T.

``compare_samplers`` draws ``num_images`` samples per (scheduler, steps) setting from one fixed
noise tensor, counts the network evaluations (NFE: Heun and DPM-Solver's first steps differ from
"steps"), times them, and scores them against precomputed reference features.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from tqdm.auto import tqdm

from diffusion_lab.components.schedulers import scheduler_class
from diffusion_lab.diffusion.sampling import sample
from diffusion_lab.metrics.distribution import distribution_metrics
from diffusion_lab.metrics.features import FeatureExtractor

# (scheduler short name, inference steps): the sampler study
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
def draw(unet, scheduler_config: dict, name: str, steps: int, noise: torch.Tensor, batch_size: int = 250, seed: int = 0, device: torch.device | str = "cpu") -> tuple[torch.Tensor, int, float]:
    """Samples ``[N, C, H, W]`` in [-1, 1] from x_T = ``noise`` ``[N, C, H, W]`` with scheduler
    ``name`` at ``steps``; returns (images, network evaluations per image, seconds)."""
    cls = scheduler_class(name)
    calls = 0

    def denoise(x, t, **cond):
        nonlocal calls
        calls += 1
        return unet(x, t, **cond).sample

    out = []
    n_batches = (len(noise) + batch_size - 1) // batch_size
    t0 = time.perf_counter()
    for b in range(n_batches):
        x_T = noise[b * batch_size : (b + 1) * batch_size]
        cond = {}
        if unet.config.num_class_embeds:  # classes 0..K-1 in turn, as diffusion_lab.sample draws them
            cond = {"class_labels": (torch.arange(len(x_T)) + b * batch_size).remainder(unet.config.num_class_embeds).to(device)}
        g = torch.Generator().manual_seed(seed + b)  # the stochastic samplers' (DDPM) per-step noise
        x = sample(denoise, cls.from_config(scheduler_config), tuple(x_T.shape), steps, generator=g, device=device, cond=cond, noise=x_T)
        out.append(x.clamp(-1, 1).cpu())
    seconds = time.perf_counter() - t0
    return torch.cat(out), calls // n_batches, seconds


def compare_samplers(
    unet,
    scheduler_config: dict,
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
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    noise = torch.randn((num_images, cfg.in_channels, size, size), generator=torch.Generator().manual_seed(seed))
    rows, images = [], {}
    for name, steps in tqdm(list(settings), desc="samplers"):
        x, nfe, seconds = draw(unet, scheduler_config, name, steps, noise, batch_size, seed, device)
        feats, logits = extractor.extract(x, desc=f"{name}-{steps} features")
        metrics = distribution_metrics(real_features, feats, logits, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
        rows.append({"sampler": name, "steps": steps, "nfe": nfe, "seconds": round(seconds, 3), "seconds_per_image": seconds / num_images, **metrics})
        images[f"{name}-{steps}"] = x
    return rows, images
