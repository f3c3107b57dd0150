"""The first stage of latent diffusion (Rombach et al. 2022, sec. 3.1): train diffusers'
``AutoencoderKL`` on reconstruction + a small KL pull towards N(0, I), then measure the latent
standard deviation and write ``scaling_factor = 1 / std`` into the VAE's own config (sec. 4.3.2),
so every latent model that loads the exported folder reads it from there.

    loss = |D(z) - x|  +  kl_weight * KL(q(z|x) || N(0, I)) / (c h w),     z ~ q(z|x)
"""

from __future__ import annotations

from typing import Callable, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader

from diffusion_lab.components.shapes import downsample_factor, sample_size
from diffusion_lab.modules.diffusion_module import OptimizerFactory
from diffusion_lab.utils.errors import ConfigError

Reconstruction = Literal["l1", "l2"]


@torch.no_grad()
def latent_statistics(vae: torch.nn.Module, batches, generator: torch.Generator | None = None) -> dict[str, float]:
    """Mean and standard deviation of posterior samples z ~ q(z|x) ``[N, c, h, w]`` over every
    element of ``batches`` (dicts with ``pixel_values`` ``[N, C, H, W]`` in [-1, 1])."""
    total, sq, n = 0.0, 0.0, 0
    for batch in batches:
        x = batch["pixel_values"].to(vae.device, vae.dtype)
        z = vae.encode(x).latent_dist.sample(generator).double()
        total, sq, n = total + z.sum().item(), sq + z.square().sum().item(), n + z.numel()
    if n == 0:
        raise ConfigError("cannot measure the VAE latent std: the training data gave no batches (check data.* and data.val_fraction).")
    mean = total / n
    return {"mean": mean, "std": max(sq / n - mean**2, 0.0) ** 0.5}


class AutoencoderModule(pl.LightningModule):
    """Trains an ``AutoencoderKL``; its export (``diffusion_lab.export``) writes a diffusers folder whose config
    carries the measured ``scaling_factor``.

    Args:
        vae: the autoencoder (``diffusers.AutoencoderKL``), built by Hydra.
        optimizer: partial of an optimizer taking ``params`` (Hydra ``_partial_``).
        lr_scheduler: partial of ``diffusers.optimization.get_scheduler`` or None.
        kl_weight: weight of the KL term per latent element. Small: the KL only keeps the latent
            space bounded; the scaling factor (not the KL) brings it to unit variance.
        reconstruction: ``l1`` (sharper edges, as LDM) or ``l2``.
        scale_batches: training batches used to measure the latent std (None = the whole set).
    """

    def __init__(
        self,
        vae: torch.nn.Module,
        optimizer: OptimizerFactory,
        lr_scheduler: Callable | None = None,
        kl_weight: float = 1e-3,
        reconstruction: Reconstruction = "l1",
        scale_batches: int | None = None,
    ) -> None:
        super().__init__()
        if reconstruction not in ("l1", "l2"):
            raise ConfigError(f"model.reconstruction must be 'l1' or 'l2'; got {reconstruction!r}.")
        self.save_hyperparameters(ignore=["vae", "optimizer", "lr_scheduler"])
        self.vae = vae
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.run_config: dict | None = None  # set by train.py; stored in checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["diffusion_lab_config"] = self.run_config

    def latent_shape(self, n: int) -> tuple[int, ...]:
        """Shape of the latents of ``n`` images of ``vae.config.sample_size``: ``(n, c, H/f, W/f)``."""
        cfg = self.vae.config
        size = sample_size(cfg) // downsample_factor(cfg.block_out_channels)
        return (n, cfg.latent_channels, size, size)

    def losses(self, x: torch.Tensor, sample: bool) -> dict[str, torch.Tensor]:
        """Images ``[N, C, H, W]`` in [-1, 1] -> reconstruction, KL (per latent element) and total loss."""
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample() if sample else posterior.mode()
        recon = self.vae.decode(z).sample
        rec = F.l1_loss(recon, x) if self.hparams.reconstruction == "l1" else F.mse_loss(recon, x)
        kl = posterior.kl().mean() / z[0].numel()
        return {"loss": rec + self.hparams.kl_weight * kl, "rec_loss": rec, "kl": kl}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.losses(batch["pixel_values"], sample=True)
        n = len(batch["pixel_values"])
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=n)
        self.log_dict({"train/rec_loss": out["rec_loss"], "train/kl": out["kl"]}, batch_size=n)
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # the posterior mean: val/loss is deterministic and comparable across runs
        out = self.losses(batch["pixel_values"], sample=False)
        n = len(batch["pixel_values"])
        self.log("val/loss", out["loss"], prog_bar=True, sync_dist=True, batch_size=n)
        self.log_dict({"val/rec_loss": out["rec_loss"], "val/kl": out["kl"]}, sync_dist=True, batch_size=n)
        return out["loss"]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer, num_training_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- scaling factor and export ----------------------------------------------------------
    def training_batches(self, batch_size: int = 256):
        """Batches of the training split (unshuffled, no augmentation beyond the data set's own)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        dataset = getattr(dm, "train_set", None)
        if dataset is None:
            raise ConfigError("measuring the VAE scaling factor needs the training data of data.datamodule (diffusion_lab.data.DiffusionDataModule).")
        loader = DataLoader(dataset, batch_size=batch_size)
        limit = self.hparams.scale_batches
        return (b for i, b in enumerate(loader) if limit is None or i < limit)

    def set_scaling_factor(self, batches=None) -> dict[str, float]:
        """Measure the posterior-sample std on ``batches`` (default: the training split) and write
        ``scaling_factor = 1 / std`` into ``vae.config``. Returns the statistics."""
        was_training = self.vae.training
        self.vae.eval()
        g = torch.Generator(self.device).manual_seed(0)
        stats = latent_statistics(self.vae, batches if batches is not None else self.training_batches(), g)
        self.vae.train(was_training)
        stats["scaling_factor"] = 1.0 / stats["std"]
        self.vae.register_to_config(scaling_factor=stats["scaling_factor"])
        rank_zero_info(f"VAE latents: mean {stats['mean']:.4f}, std {stats['std']:.4f} -> scaling_factor {stats['scaling_factor']:.5f}")
        if self._trainer is not None:
            for logger in self.trainer.loggers:
                logger.log_metrics({f"latent/{k}": v for k, v in stats.items()}, step=self.trainer.global_step)
        return stats
