"""Export a diffusers pipeline folder when training ends (EMA weights, rank zero, atomic)."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.components.fsdp import gathered, takes_part
from diffusion_lab.export import export
from diffusion_lab.export.single_file import SINGLE_FILE, save as save_single_file


class ExportCallback(pl.Callback):
    """Calls ``diffusion_lab.export.export(pl_module, dirpath)`` inside the EMA scope at the end of
    ``fit``; the model family decides the format (DDPMPipeline, StableDiffusionPipeline, LoRA files).
    ``single_file``: a full pipeline is also written as ``<dirpath>/../model.safetensors`` in the
    original layout A1111 / ComfyUI read (SD 1.x, SDXL; SD3's, FLUX.1's transformer: ``export/single_file.py``)."""

    def __init__(self, dirpath: str, on_interrupt: bool = False, lora_format: str = "both", single_file: bool = True) -> None:
        self.dirpath = dirpath
        self.on_interrupt = on_interrupt
        self.lora_format = lora_format  # LoRA runs: diffusers | kohya | both (export/kohya.py)
        self.single_file = single_file
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
                pipe = export(pl_module, self.dirpath, self.lora_format)
                if self.single_file and pipe is not None:
                    save_single_file(pipe, Path(self.dirpath).parent / SINGLE_FILE)
        self.exported_to = self.dirpath
        rank_zero_info(f"exported pipeline to {self.dirpath}")
