"""What a person watches while a run trains: the learning rate (in the loggers) and a progress
bar counted in optimizer steps."""

from __future__ import annotations

import time
from datetime import timedelta

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor as _LightningLRMonitor
from pytorch_lightning.callbacks import Timer
from rich.progress import ProgressColumn
from rich.text import Text

from diffusion_lab.compat.lightning import RichProgressBarHooks, timer_limit_seconds


class LearningRateMonitor(_LightningLRMonitor):
    """Lightning's ``LearningRateMonitor`` that does nothing when the run has no logger
    (``logger=none``), instead of refusing to start: there is nowhere to write the rate to."""

    def on_train_start(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


def _steps_bounded(trainer: pl.Trainer) -> bool:
    """Training stops on ``trainer.max_steps``, not on a number of epochs."""
    return trainer.max_steps > 0 and trainer.max_epochs in (None, -1)


class _RateColumn(ProgressColumn):
    """Steps per second since this launch started (``s/it`` below one step per second): Rich's own
    speed needs several updates inside 30 s and reads ``0.00it/s`` on slow CPU runs."""

    def __init__(self, bar: "StepProgressBar", style) -> None:
        self.bar, self.style = bar, style
        super().__init__()

    def render(self, task) -> Text:
        rate = self.bar.steps_per_second()
        if not rate:
            return Text("-- it/s", style=self.style)
        return Text(f"{rate:.2f}it/s" if rate >= 1 else f"{1 / rate:.1f}s/it", style=self.style)


class StepProgressBar(RichProgressBarHooks):
    """Rich progress bar that, on step-bounded runs (``trainer.max_steps``, ``max_epochs=-1``),
    is one bar over the whole run: ``step k/N`` (plus ``trainer.max_time`` when set) instead of
    Lightning's per-epoch ``Epoch 0/-2``. Epoch-bounded runs look as in Lightning."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._start: tuple[float, int] | None = None

    def steps_per_second(self) -> float | None:
        if self._start is None or self.trainer is None:
            return None
        seconds, steps = time.monotonic() - self._start[0], self.trainer.global_step - self._start[1]
        return steps / seconds if steps > 0 and seconds > 0 else None

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = (time.monotonic(), trainer.global_step)
        super().on_train_start(trainer, pl_module)

    @property
    def total_train_batches(self):
        return self.trainer.max_steps if _steps_bounded(self.trainer) else super().total_train_batches

    def train_description(self, current_epoch: int) -> str:
        if not _steps_bounded(self.trainer):
            return super().train_description(current_epoch)
        timer = next((cb for cb in self.trainer.callbacks if isinstance(cb, Timer)), None)
        limit = timer_limit_seconds(timer) if timer is not None else None  # trainer.max_time, in seconds
        return "step" + (f" (time limit {timedelta(seconds=int(limit))})" if limit is not None else "")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if _steps_bounded(trainer) and self.train_progress_bar_id is not None and self.progress is not None:
            return  # one bar for the whole run: a new epoch does not reset it
        super().on_train_epoch_start(trainer, pl_module)
        if _steps_bounded(trainer) and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not _steps_bounded(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self.start_train_bar()
        self.update_bar(self.train_progress_bar_id, trainer.global_step)
        self.update_bar_metrics(trainer, pl_module)
        self.refresh()

    def configure_columns(self, trainer) -> list:
        columns = super().configure_columns(trainer)
        return [*columns[:-1], _RateColumn(self, self.theme.processing_speed)]
