"""FID / KID on a small sample during training (off by default: ``callbacks=with_fid``)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.components.fsdp import takes_part
from diffusion_lab.metrics.distribution import fid, kid
from diffusion_lab.metrics.features import FeatureExtractor


class FIDCallback(pl.Callback):
    """Every ``every_n_epochs`` epochs (and/or ``every_n_steps`` optimizer steps) draw
    ``num_images`` samples with the EMA weights from fixed noise, and log ``val/fid`` and
    ``val/kid`` against ``num_reference`` training images (embedded once) in ``features`` space.

    Rank zero computes and logs (the other ranks wait at the next gradient all-reduce); the
    torchmetrics metrics never sync across processes.
    A few hundred samples give a biased but comparable-across-steps FID, not a paper number.
    """

    def __init__(
        self,
        features: FeatureExtractor,
        every_n_epochs: int = 5,
        every_n_steps: int = 0,
        num_images: int = 256,
        num_reference: int = 1000,
        num_inference_steps: int | None = None,
        seed: int = 0,
    ) -> None:
        self.features = features
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.num_reference = num_reference
        self.num_inference_steps = num_inference_steps
        self.seed = seed
        self._real: torch.Tensor | None = None
        self.history: list[dict] = []

    def _reference_features(self, trainer) -> torch.Tensor:
        if self._real is None:
            dm = trainer.datamodule
            ds = dm.train_set if getattr(dm, "train_set", None) is not None else dm.dataset
            n = min(self.num_reference, len(ds))
            idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(self.seed))[:n].tolist()
            images = torch.stack([ds[i]["pixel_values"] for i in idx])
            self._real = self.features.to("cpu").extract(images, desc="fid reference")[0]
        return self._real

    def measure(self, trainer, pl_module) -> dict:
        """Sample, embed and score now; returns ``{"val/fid": ..., "val/kid": ...}``."""
        real = self._reference_features(trainer)
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(pl_module.latent_shape(self.num_images), generator=g)
        with ema_weights(trainer, pl_module):
            images = pl_module.generate(self.num_images, num_inference_steps=self.num_inference_steps, generator=g, noise=noise)
        fake = self.features.extract(images.cpu(), desc="fid samples")[0]
        kid_mean, _ = kid(real, fake, subsets=50)
        return {"val/fid": fid(real, fake), "val/kid": kid_mean}

    def _run(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero and takes_part(trainer, pl_module):  # FSDP: sample along with rank 0
            with ema_weights(trainer, pl_module):
                pl_module.generate(self.num_images, num_inference_steps=self.num_inference_steps, noise=torch.zeros(pl_module.latent_shape(self.num_images)))
        if trainer.is_global_zero:
            values = self.measure(trainer, pl_module)
            self.history.append({"step": trainer.global_step, **values})
            # straight to the loggers at this step (as the sample grids): ``self.log`` from a batch
            # hook would repeat the value at every later step until the next measurement
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})  # monitors, sweepers
            rank_zero_info(f"step {trainer.global_step}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self._run(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module)
