"""FID, KID and Inception Score with torchmetrics, on features extracted once.

The metrics here take features (``[N, D]``) and logits (``[N, K]``) that a ``FeatureExtractor``
already computed, so a reference set is embedded once and reused for FID, KID and every
sampler compared against it. torchmetrics does the math: its metrics are given an identity
"feature network" that passes the precomputed features through.

The features given are the whole sets, so the metrics never sync across processes
(``sync_on_compute=False``): under DDP the training callback scores on rank 0 alone, and a
metric's all-gather there would pair with another rank's unrelated collective and hang.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance


class Precomputed(nn.Module):
    """Identity "feature network" of width ``num_features`` for torchmetrics' image metrics."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance (Heusel et al. 2017) between Gaussians fitted to ``real`` ``[N, D]`` and
    ``fake`` ``[M, D]`` features, in float64."""
    metric = FrechetInceptionDistance(feature=Precomputed(real.shape[1]), normalize=True, sync_on_compute=False)
    metric.set_dtype(torch.float64)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): (mean, std) of the unbiased MMD² with a
    cubic polynomial kernel over ``subsets`` random subsets (``subset_size`` capped by the set sizes)."""
    size = min(subset_size, len(real), len(fake))
    metric = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subsets=subsets, subset_size=size, normalize=True, sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # subsets are drawn with the global RNG
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016), exp E[KL(p(y|x) || p(y))], (mean, std) over
    ``splits`` splits of the generated set's classifier ``logits`` ``[N, K]``."""
    metric = InceptionScore(feature=Precomputed(logits.shape[1]), splits=min(splits, len(logits)), normalize=False, sync_on_compute=False)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]):  # the split permutation uses the global RNG
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def distribution_metrics(
    real: torch.Tensor,
    fake: torch.Tensor,
    fake_logits: torch.Tensor | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_splits: int = 10,
) -> dict[str, float]:
    """``fid``, ``kid_mean``, ``kid_std`` and (with logits) ``is_mean``, ``is_std``."""
    out = {"fid": fid(real, fake)}
    out["kid_mean"], out["kid_std"] = kid(real, fake, subsets=kid_subsets, subset_size=kid_subset_size)
    if fake_logits is not None:
        out["is_mean"], out["is_std"] = inception_score(fake_logits, splits=is_splits)
    return out
