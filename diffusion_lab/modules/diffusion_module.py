"""``DiffusionModule``: the training step every diffusion model here shares.

    encode(batch) -> x0 ; noised = process.noised(x0) ;
    out = backbone(noised.model_input, noised.timestep, **cond) ; process.loss(out, noised)

The process (vp, flow_matching, edm: ``diffusion_lab/diffusion/processes.py``) says how data is
noised and what the network learns; the sampler (``diffusion/sampling.py``) how samples are drawn;
the codec (``vae=``) how images become the diffused tensor (pixel models: ``vae=identity``); the
conditioner what else the network sees (``conditioning=none|class_labels``). A pixel model is this
class with the identity codec; every text-to-image family is ``LatentDiffusion`` (``modules/latent.py``)
with a ``Family`` (``diffusion_lab/families/``) saying what differs.
The module holds the training step and the optimisers only: sampling is ``Generation``
(``modules/generation.py``), export ``diffusion_lab/export``, latent caching ``callbacks/caching.py``.
"""

from __future__ import annotations

from typing import Any, Callable

import pytorch_lightning as pl
import torch

from diffusion_lab.compat.diffusers import supports_gradient_checkpointing
from diffusion_lab.compat.lightning import attached_trainer
from diffusion_lab.components.conditioning import Unconditional
from diffusion_lab.components.speed import AttentionBackend, apply_speed_switches, clip_fused_gradients
from diffusion_lab.components.vae import IdentityCodec
from diffusion_lab.diffusion.objectives import downsample_mask
from diffusion_lab.diffusion.processes import Process
from diffusion_lab.diffusion.sampling import Sampler
from diffusion_lab.metrics.stratified import LossByLevel
from diffusion_lab.modules.generation import Generation
from diffusion_lab.utils.errors import ConfigError

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


class DiffusionModule(Generation, pl.LightningModule):
    """Shared diffusion training (sampling: ``Generation``, ``modules/generation.py``).

    Args:
        backbone: the denoiser (``backbone=``: ``UNet2DModel`` / ``UNet2DConditionModel`` / a transformer).
        codec: images <-> diffused tensor (``VAECodec`` or ``IdentityCodec``; None = identity on
            the UNet's channels).
        conditioner: ``Unconditional`` / ``ClassLabels`` (None = unconditional); text families
            pass their text conditioner and override ``conditioning``.
        resolution: of the training images (``data.resolution``): sets the sampled shape.
        process: the diffusion process (``process=vp|flow_matching|edm``): noising, target, weights.
        sampler: how previews and the exported pipeline sample (``sampler=default|ddim|dpmpp|...``);
            checked against the process here, before training.
        optimizer: ``functools.partial`` of an optimizer taking the parameters (Hydra ``_partial_``).
        lr_scheduler: partial of ``diffusers.optimization.get_scheduler`` (name, warmup) or None;
            ``num_training_steps`` is filled from the trainer.
        preview_steps: inference steps for sample grids during training.
        guidance_rescale: of classifier-free guidance when sampling (Lin et al. 2024; 0 = off).
        val_buckets: validation loss is also logged per noise-level bucket, ``val/loss_t<k>`` for
            k < ``val_buckets`` equal-width buckets of the level (``metrics/stratified.py``; 0 = off).
        compile_backbone, channels_last, attention: speed switches (``diffusion_lab/components/speed.py``).
        gradient_checkpointing: recompute the backbone's activations in backward (``model.gradient_checkpointing``;
            diffusers' ``enable_gradient_checkpointing``, every family): less memory, more compute.
        method: what a training step optimises (``method=``, ``diffusion_lab/methods/``): None = the
            process's supervised loss; DPO, GRPO, distillation are ``Method`` parts.
        pretrained: the pipeline folder / hub id the parts were read from (``model.pretrained``; the
            ``*_pretrained`` backbone and process configs read it), recorded in the checkpoint.
        local_files_only: never touch the network when loading from ``pretrained``.
    """

    # constructor arguments that are built objects, kept out of hparams (subclasses extend it)
    hparams_ignore: tuple[str, ...] = ("backbone", "process", "sampler", "codec", "conditioner", "optimizer", "lr_scheduler", "method")
    # processes this model family can train and export (``process=``); others are a ConfigError
    processes: tuple[str, ...] = ("vp", "flow_matching", "edm")
    # why a process is missing from ``processes`` (for the error message)
    process_limits: str = ""
    # the ``model=`` option that builds this class (for messages)
    option: str = "pixel_ddpm"

    def __init__(
        self,
        backbone: torch.nn.Module,
        process: Process,
        sampler: Sampler,
        optimizer: OptimizerFactory,
        codec: torch.nn.Module | None = None,
        conditioner=None,
        resolution: int | None = None,
        lr_scheduler: Callable | None = None,
        preview_steps: int = 50,
        guidance_rescale: float = 0.0,
        val_buckets: int = 8,
        compile_backbone: bool = False,
        channels_last: bool = False,
        attention: AttentionBackend = "sdpa",
        gradient_checkpointing: bool = False,
        method=None,
        pretrained: str | None = None,
        local_files_only: bool = False,
    ) -> None:
        super().__init__()
        self.check_process(process, sampler)
        self.save_hyperparameters(ignore=list(self.hparams_ignore))
        backbone = apply_speed_switches(backbone, channels_last=channels_last, attention=attention)
        if gradient_checkpointing:
            if not supports_gradient_checkpointing(backbone):
                raise ConfigError(f"model.gradient_checkpointing=true: {type(backbone).__name__} has no gradient checkpointing; set it to false.")
            backbone.enable_gradient_checkpointing()  # diffusers' own: UNet2D(Condition)Model, DiT, SD3, Flux
        backbone.train()  # from_pretrained (backbone=pixel_pretrained, ...) returns eval mode; Lightning keeps the mode it finds
        self.backbone = torch.compile(backbone) if compile_backbone else backbone
        self.process = process
        self.sampler = sampler
        self.codec = codec if codec is not None else IdentityCodec(backbone.config.in_channels)
        self.conditioner = conditioner if conditioner is not None else Unconditional()
        self.optimizer_factory = optimizer
        self.method = method
        self.lr_scheduler_factory = lr_scheduler
        self.val_loss_by_level = LossByLevel(val_buckets) if val_buckets > 0 else None
        self.run_config: dict | None = None  # set by train.py; stored in checkpoints

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` shard the trained parts (``components/fsdp.py``); a no-op otherwise."""
        from diffusion_lab.components.fsdp import FSDP2Strategy, is_sharded

        trainer = attached_trainer(self)
        strategy = trainer.strategy if trainer is not None else None
        if isinstance(strategy, FSDP2Strategy) and not is_sharded(self):
            strategy.shard(self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["diffusion_lab_config"] = self.run_config
        if self.method is not None:
            checkpoint["diffusion_lab_method"] = self.method.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.method is not None and "diffusion_lab_method" in checkpoint:
            self.method.load_state_dict(checkpoint["diffusion_lab_method"])

    def setup(self, stage: str) -> None:
        """Fitting with a method: its ``setup`` runs here, before Lightning restores a checkpoint, so a
        reference copy is the starting model on a resume too (a checkpoint's method state comes after)."""
        if stage == "fit" and self.method is not None:
            self.method.setup(self)

    @classmethod
    def check_process(cls, process: Process, sampler: Sampler) -> None:
        """ConfigError naming the keys when this family cannot train ``process`` or ``sampler``
        cannot sample it (called when the config is instantiated, before training)."""
        if process.kind not in cls.processes:
            raise ConfigError(
                f"process={process.kind} cannot be used with model={cls.option} ({cls.__name__} trains "
                f"{', '.join(cls.processes)}). {cls.process_limits}".strip()
            )
        sampler.check(process.kind)

    # ---- encode / decode / condition (the codec's and conditioner's) --------------------------
    def encode(self, batch: dict) -> torch.Tensor:
        """Batch -> the diffused tensor ``[N, c, H/f, W/f]``: the image itself for pixel models; for
        latent models a fresh posterior sample while training and its mean in eval (deterministic
        val/loss). Cached batches carry the posterior (``latent_moments``), so the draw is the same."""
        moments = batch["latent_moments"] if "latent_moments" in batch else self.codec.moments(batch["pixel_values"])
        return self.codec.latents(moments.to(self.device), sample=self.codec.sample_posterior and self.training)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Diffused tensor -> images in [-1, 1], ``[N, 3|1, H, W]``."""
        return self.codec.decode(x0)

    def conditioning(self, batch: dict, train: bool) -> dict[str, torch.Tensor]:
        """Extra backbone keyword arguments for this batch (class labels, text states)."""
        return self.conditioner(batch, train)

    def sampling_conditioning(self, cond_batch: dict | None, n: int) -> tuple[dict, dict | None]:
        """(cond, uncond) keyword arguments for sampling; unconditional models return ({}, None)."""
        return self.conditioner.sampling(cond_batch, n, self.device)

    # ---- shared -----------------------------------------------------------------------------
    @property
    def base_backbone(self) -> torch.nn.Module:
        """The backbone without a torch.compile wrapper (for saving and EMA)."""
        return getattr(self.backbone, "_orig_mod", self.backbone)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.backbone(x_t, t, **cond).sample

    def per_sample_losses(self, batch: dict, train: bool = True, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the process's loss of each example ``[N]``, its noise level in [0, 1] ``[N]``);
        ``generator`` (validation) fixes noise and levels, drawn on the CPU so every device sees
        the same numbers."""
        x0 = self.encode(batch)
        cond = self.conditioning(batch, train=train)
        noised = self.process.noised(x0, generator=generator)
        output = self.denoise(noised.model_input, noised.timestep, **cond)
        mask = batch.get("mask")  # per-pixel loss mask [N, 1, H, W] (data.masks), brought to the latents' size
        if mask is not None:
            mask = downsample_mask(mask.to(x0.device), self.codec.downsample_factor)
        return self.process.loss(output, noised, reduce=False, mask=mask), noised.level

    def diffusion_loss(self, batch: dict, train: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """The process's loss on this batch (the mean of ``per_sample_losses``)."""
        return self.per_sample_losses(batch, train=train, generator=generator)[0].mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.method is not None:
            return self.method.training_step(self, batch, batch_idx)
        loss = self.diffusion_loss(batch, train=True)
        bs = batch_len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        return loss

    def _logging_step(self, step: int) -> bool:
        """Lightning writes step metrics every ``trainer.log_every_n_steps``: the extra diagnostics
        (grad norm, memory) are only computed on those steps, off the hot path (images/s: callbacks.throughput)."""
        return step % max(1, self.trainer.log_every_n_steps) == 0

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._logging_step(self.global_step):
            self.log("train/peak_memory_mb", peak_memory_mb(self.device), batch_size=batch_len(batch))

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Fixed noise and timesteps per batch: val/loss is comparable across epochs and runs.
        g = torch.Generator().manual_seed(1000 + batch_idx)
        losses, levels = self.per_sample_losses(batch, train=False, generator=g)
        loss = losses.mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_len(batch))
        if self.val_loss_by_level is not None:
            self.val_loss_by_level.update(losses, levels)
        return loss

    def on_validation_epoch_start(self) -> None:
        if self.val_loss_by_level is not None:
            self.val_loss_by_level.reset()

    def on_validation_epoch_end(self) -> None:
        if self.val_loss_by_level is None:
            return
        by_level = self.val_loss_by_level.compute()  # summed over ranks: the same on every rank
        for k, value in enumerate(by_level.tolist()):
            if value == value:  # an empty bucket (NaN) is not logged
                self.log(f"val/loss_t{k}", value)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._logging_step(self.global_step + 1):  # the step this update completes
            return
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        if grads:  # every trained weight (backbone, adapters, text encoders, ControlNet, embeddings): one foreach norm
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # a fused optimizer under bf16-mixed: Lightning refuses to clip it, components.speed clips it
        if not clip_fused_gradients(self.trainer, optimizer, gradient_clip_val, gradient_clip_algorithm):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.trainable_parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer, num_training_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
