"""``Generation``: the sampling half of ``DiffusionModule`` (its training step is
``modules/diffusion_module.py``): images drawn with the module's denoiser, codec and conditioner
through the one sampling loop (``diffusion/sampling.py``), for previews, ``sample`` and ``evaluate``.
A family changes it through ``guide``, ``latent_shape`` and ``sampling_schedule``."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from diffusion_lab.compat.lightning import attached_trainer
from diffusion_lab.components.shapes import sample_size
from diffusion_lab.diffusion.sampling import Sampler, sample


class Generation:
    """Mixed into ``DiffusionModule``: reads its ``process``, ``sampler``, ``codec``, ``hparams``
    (``resolution``, ``preview_steps``, ``guidance_rescale``), ``denoise``, ``decode`` and
    ``sampling_conditioning``."""

    # the pipeline's guidance rule ``(cond, uncond, w) -> prediction`` (None: classifier-free guidance, ``u + w (c - u)``)
    guide = None

    def sampling_scheduler(self, sampler: Sampler | None = None):
        """A fresh diffusers scheduler (they hold state) running ``sampler`` (default: the
        configured one) on the trained schedule."""
        return self.process.sampling_scheduler(sampler or self.sampler)

    def latent_shape(self, n: int) -> tuple[int, ...]:
        """``(n, c, H/f, W/f)``: what the network samples (``resolution`` / the codec's factor; else
        the UNet's ``sample_size``)."""
        if self.hparams.resolution:
            size = self.hparams.resolution // self.codec.downsample_factor
        else:
            size = sample_size(self.base_backbone.config)
        return (n, self.codec.latent_channels, size, size)

    def sampling_schedule(self, scheduler, shape: tuple[int, ...], num_inference_steps: int) -> dict | None:
        """Extra ``set_timesteps`` arguments the family's pipeline passes (None: none; SD3/Flux: ``mu``, ``sigmas``)."""
        return None

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
        scheduler = scheduler or self.sampling_scheduler()
        shape, steps = self.latent_shape(n), num_inference_steps or self.hparams.preview_steps
        # bf16 on GPUs, and wherever training runs bf16-mixed (trainer=fsdp gathers bf16 weights, CPU too)
        trainer = attached_trainer(self)
        bf16 = self.device.type == "cuda" or (trainer is not None and trainer.precision == "bf16-mixed")
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        with autocast:
            x0 = sample(
                self.denoise,
                scheduler,
                shape,
                steps,
                generator=generator,
                device=self.device,
                cond=cond,
                uncond=uncond,
                guidance_scale=guidance_scale,
                guidance_rescale=self.hparams.guidance_rescale,
                noise=noise,
                schedule=self.sampling_schedule(scheduler, shape, steps),
                guide=self.guide,
            )
            images = self.decode(x0)
        self.train(was_training)
        return images.float().clamp(-1, 1)

