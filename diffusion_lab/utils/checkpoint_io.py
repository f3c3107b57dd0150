"""Checkpoint writes that a kill cannot corrupt (plugged into the trainer by ``conf/trainer``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from diffusion_lab.utils.io import atomic_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temp file beside the target, fsync, then ``os.replace``.

    Lightning's own writer stages the file in the system temp dir and ``shutil.move``\\ s it over;
    when ``/tmp`` is another filesystem that move is a copy, and a SIGKILL during the copy leaves
    a truncated ``last.ckpt`` (and the staged file leaks in ``/tmp``). Here a kill at any moment
    leaves the previous checkpoint whole; a temp file it leaves behind is removed by the next save
    of the same checkpoint.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_file(path) as tmp:
            torch.save(checkpoint, tmp)
