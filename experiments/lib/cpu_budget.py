"""Stop training after a budget of this process's CPU time (``time.process_time``): comparisons
at equal compute on a shared machine, where wall time (``trainer.max_time``) depends on the load.

    +callbacks.cpu_budget='{_target_: experiments.lib.cpu_budget.CPUTimeBudget, seconds: 240}'

from the repository root (``python -m diffusion_lab.train`` puts the current folder on ``sys.path``).
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info


class CPUTimeBudget(pl.Callback):
    """Ends ``fit`` (``trainer.should_stop``) once training has used ``seconds`` of process CPU time,
    counted from the first training batch (model building and data loading are not counted)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.start: float | None = None
        self.used: float = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.used = time.process_time() - (self.start or 0.0)
        if self.used >= self.seconds and not trainer.should_stop:
            trainer.should_stop = True
            rank_zero_info(f"CPU-time budget of {self.seconds:.0f} s reached at step {trainer.global_step}")
            pl_module.log("train/cpu_seconds", self.used)
