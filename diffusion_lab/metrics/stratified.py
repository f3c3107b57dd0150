"""Loss by noise level: where in the schedule the validation loss moved.

Every process gives each noised example a level in [0, 1] (``Noised.level``: 0 = clean, 1 = pure
noise; vp: t / (T - 1), flow matching: sigma, edm: position of log sigma in the sampling range).
``LossByLevel`` averages per-example losses in ``num_buckets`` equal-width buckets of that level,
so bucket k covers levels [k / K, (k + 1) / K). The bucket means weighted by their counts are the
plain mean loss, so ``val/loss_t<k>`` decomposes ``val/loss`` exactly.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def level_buckets(levels: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bucket index ``[N]`` (long, 0..K-1) of noise levels ``[N]`` in [0, 1]; level 1 is in K-1."""
    return (levels.detach().float() * num_buckets).long().clamp(0, num_buckets - 1)


class LossByLevel(Metric):
    """Mean loss per noise-level bucket, summed over batches and (under DDP) over ranks.

    ``update(losses [N], levels [N])``; ``compute()`` -> ``[K]`` means (NaN for an empty bucket);
    ``counts`` ``[K]`` says how many examples each mean is over.
    """

    full_state_update = False

    def __init__(self, num_buckets: int = 8) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.add_state("sums", torch.zeros(num_buckets), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(num_buckets), dist_reduce_fx="sum")

    def update(self, losses: torch.Tensor, levels: torch.Tensor) -> None:
        k = level_buckets(levels, self.num_buckets).to(self.sums.device)
        self.sums.index_add_(0, k, losses.detach().float().to(self.sums.device))
        self.counts.index_add_(0, k, torch.ones_like(self.sums[k]))

    def compute(self) -> torch.Tensor:
        return self.sums / self.counts
