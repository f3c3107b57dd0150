"""Per-rank randomness under DDP."""

from __future__ import annotations

import random

import numpy as np
import pytorch_lightning as pl
import torch


class RankSeedCallback(pl.Callback):
    """Reseeds torch / NumPy / Python with ``seed + global_rank`` once the process group is up.

    Lightning reseeds every rank with the one run seed when it starts the process group, so
    without this every rank draws the *same* noise and timesteps for its own images (a global
    batch of 2 x 8 would carry only 8 distinct (noise, t) draws). The model is built before
    that point, so initial weights stay identical; the data order has its own seed (the
    distributed sampler's); a single process (rank 0) keeps exactly the plain run's stream.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            seed = self.seed + trainer.global_rank
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
