"""Pictures during training: sample grids from fixed noise, and the forward-noising strip."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.components.fsdp import takes_part
from diffusion_lab.data.transforms import image_grid
from diffusion_lab.diffusion.noising_strip import noising_strip


def log_image(trainer, key: str, path: str, caption: str | None = None) -> None:
    """Send a saved PNG to every logger that takes images (W&B); others just keep the file."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[path], step=trainer.global_step, caption=[caption] if caption else None)


class SampleGridCallback(pl.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end) draw ``num_images`` samples from
    the *same* noise and seed, with EMA weights, and save ``samples/step_XXXXXX.png``.

    Conditional models take their conditioning from ``prompts`` (text) or class labels 0..K-1.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 500, num_images: int = 16, num_inference_steps: int | None = None, seed: int = 0, guidance_scale: float = 1.0, prompts: Sequence[str] | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.num_inference_steps = num_inference_steps
        self.seed = seed
        self.guidance_scale = guidance_scale
        self.prompts = list(prompts) if prompts else None
        self.last_path: str | None = None

    def _cond_batch(self, n: int) -> dict | None:
        if not self.prompts:
            return None
        return {"caption": [self.prompts[i % len(self.prompts)] for i in range(n)]}

    def draw(self, trainer, pl_module) -> str | None:
        """Rank 0 draws and saves (under FSDP every rank draws along: each forward gathers shards)."""
        if not takes_part(trainer, pl_module):
            return None
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(pl_module.latent_shape(self.num_images), generator=g)
        with ema_weights(trainer, pl_module):
            images = pl_module.generate(
                self.num_images,
                num_inference_steps=self.num_inference_steps,
                generator=g,
                noise=noise,
                cond_batch=self._cond_batch(self.num_images),
                guidance_scale=self.guidance_scale,
            )
        if not trainer.is_global_zero:
            return None
        path = self.dirpath / f"step_{trainer.global_step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images).save(path)
        log_image(trainer, "samples", str(path), caption=f"step {trainer.global_step}")
        self.last_path = str(path)
        return str(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        path = self.dirpath / f"step_{trainer.global_step:06d}.png"
        if not trainer.strategy.broadcast(path.exists()):  # rank 0's answer: every rank draws or none
            self.draw(trainer, pl_module)


class NoisingStripCallback(pl.Callback):
    """At the start of training, save (and log) what the forward process does to a few training
    images at ``levels`` of its schedule (0 = clean, 1 = noisiest): ``noising.png`` in the run dir."""

    def __init__(self, path: str, levels: Sequence[float] = (0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0), num_images: int = 4) -> None:
        self.path = path
        self.levels = list(levels)
        self.num_images = num_images

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "sample_batch"):
            return
        batch = dm.sample_batch(self.num_images)
        x0 = pl_module.encode({k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in batch.items()}).cpu()
        decode = lambda x: pl_module.decode(x.to(pl_module.device)).float().cpu()  # noqa: E731 (identity for pixels)
        strip = noising_strip(x0.float(), pl_module.process, self.levels, decode=decode)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        strip.save(self.path)
        log_image(trainer, "noising", self.path, caption=f"forward process ({pl_module.process.kind})")
