"""Lightning (``pytorch_lightning`` / ``lightning_fabric``) internals, checked against 2.6.6. When one
breaks, ``tests/test_compat.py`` says which; look for the public replacement in Lightning's changelog."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar, Timer


def collect_rng_states(include_cuda: bool) -> dict[str, Any]:
    """The global torch / numpy / Python (and CUDA) RNG states, as Lightning saves them in a checkpoint
    (``lightning_fabric.utilities.seed._collect_rng_states``, 2.6.6). If it vanishes, collect
    ``torch.get_rng_state``, ``numpy.random.get_state``, ``random.getstate`` (and CUDA's) here."""
    from lightning_fabric.utilities.seed import _collect_rng_states

    return _collect_rng_states(include_cuda=include_cuda)


def set_rng_states(state: dict[str, Any]) -> None:
    """Restore what ``collect_rng_states`` returned (``lightning_fabric.utilities.seed._set_rng_states``, 2.6.6)."""
    from lightning_fabric.utilities.seed import _set_rng_states

    _set_rng_states(state)


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The trainer ``module`` is attached to, or None (``module.trainer`` raises when there is none; None
    too for a stand-in that is no LightningModule): ``LightningModule._trainer`` (2.6.6)."""
    return getattr(module, "_trainer", None)


def batches_done_this_epoch(trainer: pl.Trainer) -> int:
    """Training batches this rank has finished in the current epoch, as Lightning counts them for its own
    mid-epoch resume (``fit_loop.epoch_loop.batch_progress.current.processed``, 2.6.6); unlike a
    sampler's count it excludes the batches the loader has prefetched."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def timer_limit_seconds(timer: Timer) -> float | None:
    """``trainer.max_time`` in seconds as the ``Timer`` callback holds it, None for no limit
    (``Timer._duration``, 2.6.6; a public ``Timer.time_remaining()`` exists but needs a started run)."""
    return timer._duration


@contextmanager
def ddp_process_observer(observer: Callable[[list], Any]) -> Iterator[None]:
    """While inside, Lightning's ``ddp`` subprocess launcher hands the rank processes it starts to
    ``observer(procs)`` instead of its own watcher (``pytorch_lightning.strategies.launchers.
    subprocess_script._launch_process_observer``, 2.6.6)."""
    from pytorch_lightning.strategies.launchers import subprocess_script

    original = subprocess_script._launch_process_observer
    subprocess_script._launch_process_observer = observer
    try:
        yield
    finally:
        subprocess_script._launch_process_observer = original


class RichProgressBarHooks(RichProgressBar):
    """Lightning's ``RichProgressBar`` with the private hooks a subclass needs under public names
    (2.6.6): override ``train_description``; call ``start_train_bar``, ``update_bar`` and
    ``update_bar_metrics``."""

    def _get_train_description(self, current_epoch: int) -> str:
        return self.train_description(current_epoch)

    def train_description(self, current_epoch: int) -> str:
        """The text left of the training bar (Lightning's: ``Epoch k/N``)."""
        return super()._get_train_description(current_epoch)

    def start_train_bar(self) -> None:
        """Create the training bar's task now (``_initialize_train_progress_bar_id``)."""
        self._initialize_train_progress_bar_id()

    def update_bar(self, task_id, completed: int) -> None:
        """Move bar ``task_id`` to ``completed`` (``_update``; honours ``refresh_rate``)."""
        self._update(task_id, completed)

    def update_bar_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Redraw the logged metrics under the bar (``_update_metrics``)."""
        self._update_metrics(trainer, pl_module)
