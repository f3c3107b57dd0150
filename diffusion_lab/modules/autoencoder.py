"""The first stage of latent diffusion (Rombach et al. 2022, sec. 3.1): train a diffusers VAE on
reconstruction + a small KL pull towards N(0, I), then measure its latents and write the
normalisation its pipeline reads into the VAE itself (sec. 4.3.2), so every latent model that loads
the exported folder reads it from there.

    loss = |D(z) - x|  +  kl_weight * KL(q(z|x) || N(0, I)) / (c h w),     z ~ q(z|x)

Each VAE class keeps the normalisation where its pipeline looks for it (``components/vae.py`` and the
family codecs apply it):

| class | written at export |
|---|---|
| ``AutoencoderKL`` (SD, SDXL) | ``scaling_factor = 1 / std`` |
| ``AutoencoderKL`` with a ``shift_factor`` (SD3, FLUX.1, Z-Image, Chroma) | ``shift_factor = mean``, ``scaling_factor = 1 / std`` |
| ``AutoencoderDC`` (Sana; deterministic, no KL) | ``scaling_factor = 1 / std`` |
| ``AutoencoderKLQwenImage`` (one-frame videos) | ``latents_mean`` / ``latents_std`` per channel |
| ``AutoencoderKLFlux2`` | its batch norm's running mean / variance per 2x2-patch channel |
"""

from __future__ import annotations

from typing import Callable, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader

from diffusion_lab.modules.diffusion_module import OptimizerFactory
from diffusion_lab.utils.errors import ConfigError

Reconstruction = Literal["l1", "l2"]


def _is_video(vae) -> bool:
    return type(vae).__name__ == "AutoencoderKLQwenImage"  # causal-3D: images are one-frame videos


def encode(vae: torch.nn.Module, x: torch.Tensor, sample: bool, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, C, H, W]`` -> (raw latents ``[N, c, h, w]``, KL to N(0, I) per latent element, averaged
    over the batch). A sample of q(z|x) or its mode; ``AutoencoderDC`` has no posterior (KL 0)."""
    out = vae.encode(x[:, :, None] if _is_video(vae) else x)
    if not hasattr(out, "latent_dist"):
        return out.latent, x.new_zeros(())
    posterior = out.latent_dist
    z = posterior.sample(generator) if sample else posterior.mode()
    kl = posterior.kl().reshape(len(z), -1).sum(1).mean() / z[0].numel()  # kl() leaves a video's last axis unsummed
    return (z[:, :, 0] if _is_video(vae) else z), kl


def decode(vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Raw latents ``[N, c, h, w]`` -> images ``[N, C, H, W]``."""
    if _is_video(vae):
        return vae.decode(z[:, :, None]).sample[:, :, 0]
    return vae.decode(z).sample


def _patches(vae, z: torch.Tensor) -> torch.Tensor:
    """``AutoencoderKLFlux2``'s latents are normalised as 2x2 patches ``[N, 4c, h/2, w/2]``; others as they are."""
    from diffusion_lab.compat.diffusers import flux2_patchify_latents

    return flux2_patchify_latents(z) if type(vae).__name__ == "AutoencoderKLFlux2" else z


@torch.no_grad()
def latent_statistics(vae: torch.nn.Module, batches, generator: torch.Generator | None = None) -> dict:
    """Mean and standard deviation of posterior samples z ~ q(z|x) over every element of ``batches``
    (dicts with ``pixel_values`` ``[N, C, H, W]`` in [-1, 1]): ``mean`` / ``std`` over all elements and
    ``channel_mean`` / ``channel_std`` per channel (of the 2x2 patches for ``AutoencoderKLFlux2``)."""
    total, sq, n = 0.0, 0.0, 0
    for batch in batches:
        x = batch["pixel_values"].to(vae.device, vae.dtype)
        z = _patches(vae, encode(vae, x, sample=True, generator=generator)[0]).double()
        total, sq, n = total + z.sum(dim=(0, 2, 3)), sq + z.square().sum(dim=(0, 2, 3)), n + z[:, 0].numel()
    if n == 0:
        raise ConfigError("cannot measure the VAE latent std: the training data gave no batches (check data.* and data.val_fraction).")
    mean, channel_mean = float(total.sum() / (n * len(total))), total / n
    return {
        "mean": mean,
        "std": max(float(sq.sum() / (n * len(sq))) - mean**2, 0.0) ** 0.5,
        "channel_mean": channel_mean.tolist(),
        "channel_std": (sq / n - channel_mean**2).clamp_min(0).sqrt().tolist(),
    }


def write_normalisation(vae: torch.nn.Module, stats: dict) -> dict[str, float]:
    """Write the measured ``stats`` (``latent_statistics``) where ``vae``'s pipeline reads them (the table
    above). Returns the scalars written, for the logs."""
    name, config = type(vae).__name__, vae.config
    if name == "AutoencoderKLQwenImage":
        vae.register_to_config(latents_mean=stats["channel_mean"], latents_std=stats["channel_std"])
        return {"mean": stats["mean"], "std": stats["std"]}
    if name == "AutoencoderKLFlux2":
        bn = vae.bn
        bn.running_mean.copy_(torch.tensor(stats["channel_mean"]))
        bn.running_var.copy_((torch.tensor(stats["channel_std"]) ** 2 - config.batch_norm_eps).clamp_min(0))
        return {"mean": stats["mean"], "std": stats["std"]}
    written = {"scaling_factor": 1.0 / stats["std"]}
    if config.get("shift_factor", None) is not None:
        written["shift_factor"] = stats["mean"]
    vae.register_to_config(**written)
    return {"mean": stats["mean"], "std": stats["std"], **written}


class AutoencoderModule(pl.LightningModule):
    """Trains a diffusers VAE; its export (``diffusion_lab.export``) writes a diffusers folder that carries the
    measured latent normalisation (``write_normalisation``).

    Args:
        vae: the autoencoder, built by Hydra: ``AutoencoderKL`` (``model=autoencoder``) or the VAE of a
            pipeline folder (``model=autoencoder_pretrained``: also ``AutoencoderKLQwenImage``,
            ``AutoencoderDC``, ``AutoencoderKLFlux2``).
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
        self.vae = vae.train()  # from_pretrained returns eval mode, which Lightning keeps
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.run_config: dict | None = None  # set by train.py; stored in checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["diffusion_lab_config"] = self.run_config

    def losses(self, x: torch.Tensor, sample: bool) -> dict[str, torch.Tensor]:
        """Images ``[N, C, H, W]`` in [-1, 1] -> reconstruction, KL (per latent element) and total loss."""
        z, kl = encode(self.vae, x, sample)
        recon = decode(self.vae, z)
        rec = F.l1_loss(recon, x) if self.hparams.reconstruction == "l1" else F.mse_loss(recon, x)
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
        """Measure the posterior samples on ``batches`` (default: the training split) and write the
        normalisation into the VAE (``write_normalisation``). Returns the scalars written."""
        was_training = self.vae.training
        self.vae.eval()
        g = torch.Generator(self.device).manual_seed(0)
        stats = write_normalisation(self.vae, latent_statistics(self.vae, batches if batches is not None else self.training_batches(), g))
        self.vae.train(was_training)
        rank_zero_info("VAE latents: " + ", ".join(f"{k} {v:.5f}" for k, v in stats.items()))
        if self._trainer is not None:
            for logger in self.trainer.loggers:
                logger.log_metrics({f"latent/{k}": v for k, v in stats.items()}, step=self.trainer.global_step)
        return stats
