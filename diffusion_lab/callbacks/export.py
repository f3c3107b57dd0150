"""Export a diffusers pipeline folder when training ends (EMA weights, rank zero, atomic)."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.export import export


class ExportCallback(pl.Callback):
    """Calls ``diffusion_lab.export.export(pl_module, dirpath)`` inside the EMA scope at the end of
    ``fit``; the model family decides the format (DDPMPipeline, StableDiffusionPipeline, LoRA files)."""

    def __init__(self, dirpath: str, on_interrupt: bool = False) -> None:
        self.dirpath = dirpath
        self.on_interrupt = on_interrupt
        self.exported_to: str | None = None

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.interrupted and not self.on_interrupt:
            return
        with ema_weights(trainer, pl_module):
            export(pl_module, self.dirpath)
        self.exported_to = self.dirpath
        rank_zero_info(f"exported pipeline to {self.dirpath}")
