"""``DiffusionModule``: the training step every diffusion model here shares.

    encode(batch) -> x0 ; draw t, eps ; x_t = add_noise(x0, eps, t) ; UNet(x_t, t, cond) ;
    target(prediction_type) ; weighted MSE

Subclasses (pixel, latent) only say how to encode/decode and what the conditioning is.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from diffusers import DDPMScheduler

from diffusion_lab.diffusion import objectives
from diffusion_lab.diffusion.objectives import LossWeighting
from diffusion_lab.diffusion.sampling import sample
from diffusion_lab import perf
from diffusion_lab.perf import AttentionBackend, apply_speed_switches

OptimizerFactory = Callable[..., torch.optim.Optimizer]


def batch_len(batch: dict) -> int:
    """Number of examples in a batch (images, or cached latents)."""
    return len(next(v for v in batch.values() if torch.is_tensor(v)))


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocator peak on a GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class DiffusionModule(pl.LightningModule):
    """Shared diffusion training.

    Args:
        unet: the denoiser (``UNet2DModel`` / ``UNet2DConditionModel``).
        noise_scheduler: a diffusers scheduler; its config gives the noise schedule and the
            ``prediction_type``. Training noises with a ``DDPMScheduler`` built from that config
            (every VP scheduler shares it); the scheduler's own class is used for previews/export.
        optimizer: ``functools.partial`` of an optimizer taking the parameters (Hydra ``_partial_``).
        lr_scheduler: partial of ``diffusers.optimization.get_scheduler`` (name, warmup) or None;
            ``num_training_steps`` is filled from the trainer.
        loss_weighting: ``none`` or ``min_snr`` (with ``snr_gamma``).
        offset_noise: strength of offset noise (0 = off).
        preview_steps: inference steps for sample grids during training.
        compile_unet, channels_last, attention: speed switches (``diffusion_lab/perf.py``).
    """

    # constructor arguments that are built objects, kept out of hparams (subclasses extend it)
    hparams_ignore: tuple[str, ...] = ("unet", "noise_scheduler", "optimizer", "lr_scheduler")

    def __init__(
        self,
        unet: torch.nn.Module,
        noise_scheduler,
        optimizer: OptimizerFactory,
        lr_scheduler: Callable | None = None,
        loss_weighting: LossWeighting = "none",
        snr_gamma: float = 5.0,
        offset_noise: float = 0.0,
        preview_steps: int = 50,
        compile_unet: bool = False,
        channels_last: bool = False,
        attention: AttentionBackend = "sdpa",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=list(self.hparams_ignore))
        unet = apply_speed_switches(unet, channels_last=channels_last, attention=attention)
        self.unet = torch.compile(unet) if compile_unet else unet
        self.noise_scheduler = noise_scheduler
        self.train_scheduler = DDPMScheduler.from_config(noise_scheduler.config)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self._t_batch_start: float | None = None
        self.run_config: dict | None = None  # set by train.py; stored in checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["diffusion_lab_config"] = self.run_config

    # ---- what subclasses define -------------------------------------------------------------
    def encode(self, batch: dict) -> torch.Tensor:
        """Batch -> the tensor that is diffused, ``[N, C, H, W]``."""
        raise NotImplementedError

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Diffused tensor -> images in [-1, 1], ``[N, 3|1, H, W]``."""
        raise NotImplementedError

    def conditioning(self, batch: dict, train: bool) -> dict[str, torch.Tensor]:
        """Extra UNet keyword arguments for this batch (class labels, text states)."""
        return {}

    def export(self, out_dir: str) -> None:
        """Write a diffusers pipeline folder (called by the export callback with EMA weights)."""
        raise NotImplementedError

    # ---- shared -----------------------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        return self.train_scheduler.config.prediction_type

    @property
    def base_unet(self) -> torch.nn.Module:
        """The UNet without a torch.compile wrapper (for saving and EMA)."""
        return getattr(self.unet, "_orig_mod", self.unet)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.unet(x_t, t, **cond).sample

    def diffusion_loss(self, batch: dict, train: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        x0 = self.encode(batch)
        cond = self.conditioning(batch, train=train)
        n = x0.shape[0]
        if generator is None:
            noise = torch.randn_like(x0)
            t = objectives.sample_timesteps(n, self.train_scheduler.config.num_train_timesteps, x0.device)
        else:  # deterministic (validation): draw on CPU so every device sees the same numbers
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            t = objectives.sample_timesteps(n, self.train_scheduler.config.num_train_timesteps, generator=generator).to(x0.device)
        noise = objectives.add_offset_noise(noise, self.hparams.offset_noise)
        x_t = self.train_scheduler.add_noise(x0, noise, t)
        target = objectives.training_target(self.train_scheduler, x0, noise, t, self.prediction_type)
        output = self.denoise(x_t, t, **cond)
        weights = objectives.loss_weights(self.train_scheduler, t, self.hparams.loss_weighting, self.prediction_type, self.hparams.snr_gamma)
        return objectives.diffusion_loss(output, target, weights)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._t_batch_start = time.perf_counter()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch, train=True)
        bs = batch_len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        return loss

    def _logging_step(self, step: int) -> bool:
        """Lightning writes step metrics every ``trainer.log_every_n_steps``: the extra diagnostics
        (grad norm, images/s, memory) are only computed on those steps, off the hot path."""
        return step % max(1, self.trainer.log_every_n_steps) == 0

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._t_batch_start is not None and self._logging_step(self.global_step):
            dt = time.perf_counter() - self._t_batch_start
            bs = batch_len(batch)
            world = self.trainer.world_size if self._trainer is not None else 1
            self.log("train/images_per_sec", bs * world / max(dt, 1e-9), batch_size=bs)
            self.log("train/peak_memory_mb", peak_memory_mb(self.device), batch_size=bs)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Fixed noise and timesteps per batch: val/loss is comparable across epochs and runs.
        g = torch.Generator().manual_seed(1000 + batch_idx)
        loss = self.diffusion_loss(batch, train=False, generator=g)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_len(batch))
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._logging_step(self.global_step + 1):  # the step this update completes
            return
        grads = [p.grad for p in self.base_unet.parameters() if p.grad is not None]
        if grads:  # one foreach norm over all gradients (not one norm + sync per parameter)
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # a fused optimizer under bf16-mixed: Lightning refuses to clip it, perf clips it
        if not perf.clip_fused_gradients(self.trainer, optimizer, gradient_clip_val, gradient_clip_algorithm):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.trainable_parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer, num_training_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- sampling ---------------------------------------------------------------------------
    def sampling_scheduler(self, scheduler_cls=None):
        """A fresh scheduler (schedulers hold state) of the given class, from the training config."""
        cls = scheduler_cls or type(self.noise_scheduler)
        return cls.from_config(self.noise_scheduler.config)

    def latent_shape(self, n: int) -> tuple[int, ...]:
        cfg = self.base_unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (n, cfg.in_channels, size, size)

    @torch.no_grad()
    def generate(
        self,
        n: int,
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        scheduler=None,
        cond_batch: dict | None = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """Images in [-1, 1], ``[n, C, H, W]``. ``cond_batch`` is a batch dict for conditioning."""
        was_training = self.training
        self.eval()
        cond, uncond = self.sampling_conditioning(cond_batch, n)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        with autocast:
            x0 = sample(
                self.denoise,
                scheduler or self.sampling_scheduler(),
                self.latent_shape(n),
                num_inference_steps or self.hparams.preview_steps,
                generator=generator,
                device=self.device,
                cond=cond,
                uncond=uncond,
                guidance_scale=guidance_scale,
                noise=noise,
            )
            images = self.decode(x0)
        self.train(was_training)
        return images.float().clamp(-1, 1)

    def sampling_conditioning(self, cond_batch: dict | None, n: int) -> tuple[dict, dict | None]:
        """(cond, uncond) keyword arguments for sampling; unconditional models return ({}, None)."""
        return {}, None
