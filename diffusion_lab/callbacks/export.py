"""Export a diffusers pipeline folder when training ends (EMA weights, rank zero, atomic)."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.components.fsdp import gathered, takes_part
from diffusion_lab.export import export


class ExportCallback(pl.Callback):
    """Calls ``diffusion_lab.export.export(pl_module, dirpath)`` inside the EMA scope at the end of
    ``fit``; the model family decides the format (DDPMPipeline, StableDiffusionPipeline, LoRA files)."""

    def __init__(self, dirpath: str, on_interrupt: bool = False, lora_format: str = "both") -> None:
        self.dirpath = dirpath
        self.on_interrupt = on_interrupt
        self.lora_format = lora_format  # LoRA runs: diffusers | kohya | both (export/kohya.py)
        self.exported_to: str | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        from diffusion_lab.export.kohya import check_lora_format

        check_lora_format(self.lora_format, pl_module)  # a kohya file that cannot be written: before training

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.interrupted and not self.on_interrupt or not takes_part(trainer, pl_module):
            return
        # under FSDP every rank gathers the (EMA) shards into whole weights, rank 0 writes them
        with ema_weights(trainer, pl_module), gathered(pl_module):
            if trainer.is_global_zero:
                export(pl_module, self.dirpath, self.lora_format)
        self.exported_to = self.dirpath
        rank_zero_info(f"exported pipeline to {self.dirpath}")
