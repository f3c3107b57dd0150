"""The run's own learning curves as pictures: ``curves.png`` in the run dir (and W&B).

Left: the training loss (mean over each validation interval, and over the steps after the last one)
and ``val/loss`` against the step.
Right: the validation loss in each noise-level bucket (``val/loss_t<k>``, see
``metrics/stratified.py``) against the step, so a run shows where in the schedule it improved.
The history is kept in checkpoints, so a resumed run draws its whole curve.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from diffusion_lab.callbacks.samples import log_image


class LearningCurvesCallback(pl.Callback):
    """After every validation, and at the end of training when steps ran since the last one, record
    (step, train loss, val/loss, val/loss_t<k>) and redraw ``path`` (PNG); the numbers go to ``path``
    with suffix ``.json``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.history: list[dict] = []
        self._train_sum: torch.Tensor | None = None  # on the device: no GPU sync per step
        self._train_count = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss):
            self._train_sum = loss.detach() if self._train_sum is None else self._train_sum + loss.detach()
            self._train_count += 1

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/loss") and torch.is_tensor(v) and v.numel() == 1}
        if metrics:
            self._record(trainer, metrics)

    def on_train_end(self, trainer, pl_module) -> None:
        """The steps since the last validation (all of a run shorter than val_check_interval) are drawn too."""
        if self._train_count:
            self._record(trainer, {})

    def _record(self, trainer, metrics: dict[str, float]) -> None:
        row = {"step": trainer.global_step, **metrics}
        if self._train_count:
            row["train/loss"] = float(self._train_sum) / self._train_count
        self._train_sum, self._train_count = None, 0
        self.history.append(row)
        self.draw(trainer)

    @rank_zero_only
    def draw(self, trainer) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.history]
        buckets = sorted({k for r in self.history for k in r if k.startswith("val/loss_t")}, key=lambda k: int(k.rsplit("t", 1)[1]))
        fig, axes = plt.subplots(1, 2 if buckets else 1, figsize=(11 if buckets else 5.5, 4), squeeze=False)
        ax = axes[0][0]
        for key, style in (("train/loss", ".-"), ("val/loss", "o-")):  # markers: a run of one interval is one point
            pts = [(r["step"], r[key]) for r in self.history if key in r]
            if pts:
                ax.plot(*zip(*pts), style, label=key)
        ax.set(xlabel="step", ylabel="loss", yscale="log", title="learning curve")
        ax.legend()
        if buckets:
            ax = axes[0][1]
            cmap = plt.get_cmap("viridis")
            for i, key in enumerate(buckets):
                pts = [(r["step"], r[key]) for r in self.history if key in r]
                ax.plot(*zip(*pts), "o-", color=cmap(i / max(1, len(buckets) - 1)), label=key)
            ax.set(xlabel="step", ylabel="val loss", yscale="log", title="val loss by noise level (t0 = cleanest)")
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.path, dpi=100)
        plt.close(fig)
        self.path.with_suffix(".json").write_text(json.dumps(self.history, indent=1))
        log_image(trainer, "curves", str(self.path), caption=f"step {steps[-1]}")

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
