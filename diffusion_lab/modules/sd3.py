"""Stable Diffusion 3 / 3.5 (Esser et al. 2024): rectified flow on 16-channel VAE latents with an
MMDiT (``SD3Transformer2DModel``) that attends jointly over image patches and the text states of
three encoders (``components/text_mmdit.py``). ``LatentDiffusion`` with another backbone: the
conditioning is ``encoder_hidden_states`` + ``pooled_projections``, the process flow matching on the
pipeline's own shifted schedule, the export a ``StableDiffusion3Pipeline`` (``export/transformers.py``).
Trains as diffusers' ``examples/dreambooth/train_dreambooth_lora_sd3.py`` does (full or LoRA)."""

from __future__ import annotations

import inspect

import torch

from diffusion_lab.components.adapters import add_lora
from diffusion_lab.components.mmdit import check_transformer_parts
from diffusion_lab.modules.latent import LatentDiffusion

FLOW_ONLY = (
    "StableDiffusion3Pipeline and FluxPipeline sample with FlowMatchEulerDiscreteScheduler: the transformer was "
    "trained by flow matching on the pipeline's own (shifted) schedule; use process=flow_matching_pretrained "
    "(the model's default) or process=flow_matching."
)


def filter_set_timesteps(scheduler, **kwargs) -> dict:
    """The ``set_timesteps`` arguments ``scheduler`` takes (a DPM-Solver has no ``mu``), None dropped."""
    accepted = inspect.signature(scheduler.set_timesteps).parameters
    return {k: v for k, v in kwargs.items() if k in accepted and v is not None}


class LatentDiffusion3(LatentDiffusion):
    """``SD3Transformer2DModel`` on scaled, shifted VAE latents ``[N, 16, H/8, W/8]``.

    Conditioning (one flat dict, so the shared sampler concatenates cond/uncond per key):
    ``encoder_hidden_states`` ``[N, 77 + L, D]`` and ``pooled_projections`` ``[N, P]``. Dropped
    captions (``caption_dropout``) are encoded as "", the pipeline's negative prompt.

    Args:
        unet: the ``SD3Transformer2DModel`` (``model/unet=sd3_pretrained``; the group keeps its name).
        conditioner: an ``SD3TextConditioner`` (``text_encoder=sd3_pretrained`` or ``sd3_no_t5``).
        text_lora: LoRA on the two CLIP encoders (``adapter.train_text_encoder``; the loaders have no T5 slot).
        cache_text_dir: with ``cache``, the cached text states live in memory-mapped files in this folder
            (``data/caching.disk_states``) instead of RAM: T5's ``[L, 4096]`` fp32 states are 5-8 MB a caption.
        **kwargs: as ``LatentDiffusion`` (``unet_lora``: LoRA on the transformer).
    """

    family = "latent_sd3"
    processes = ("flow_matching",)
    process_limits = FLOW_ONLY
    text_keys = ("encoder_hidden_states", "pooled_projections")
    # 2x2 latent patches packed into the channels (Flux); 1 = the latents as they are
    packing: int = 1

    def __init__(self, unet: torch.nn.Module, process, sampler, optimizer, codec, conditioner, text_lora=None, cache_text_dir: str | None = None, **kwargs) -> None:
        if getattr(conditioner, "joint_attention_dim", False) is None:
            conditioner.joint_attention_dim = int(unet.config.joint_attention_dim)  # the zeros replacing T5
        if text_lora is not None:
            for encoder in conditioner.clip_encoders:
                add_lora(encoder, text_lora)
        super().__init__(unet, process, sampler, optimizer, codec, conditioner, **kwargs)

    @property
    def cache_states_dir(self) -> str | None:
        """Where ``callbacks/caching.py`` keeps the cached text states (None: in RAM)."""
        return self.hparams.get("cache_text_dir")

    @classmethod
    def check_parts(cls, unet, codec, conditioner, resolution: int, image_channels: int) -> None:
        check_transformer_parts(cls.family, unet, codec, conditioner, resolution, image_channels, cls.packing)

    # ---- conditioning -----------------------------------------------------------------------
    def text_states(self, captions: list[str]) -> dict[str, torch.Tensor]:
        states, pooled = self.conditioner(captions)
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor) -> torch.Tensor:
        """``[N, 16, h, w]`` at timesteps ``t`` = sigma x 1000 (the pipeline's) -> velocity, fp32; inputs in the transformer's dtype."""
        dtype = self.base_unet.dtype
        return self.unet(
            hidden_states=x_t.to(dtype), timestep=t, encoder_hidden_states=encoder_hidden_states.to(dtype), pooled_projections=pooled_projections.to(dtype)
        ).sample.float()

    # ---- sampling: the pipeline's timesteps ---------------------------------------------------
    def image_seq_len(self, shape: tuple[int, ...]) -> int:
        """Image tokens of latents ``[N, c, h, w]``: (h / p) (w / p) for patch size p."""
        p = int(self.base_unet.config.patch_size) * self.packing
        return (shape[-2] // p) * (shape[-1] // p)

    def sampling_schedule(self, scheduler, shape, num_inference_steps):
        """``StableDiffusion3Pipeline``: its scheduler's own sigmas; ``mu`` only with dynamic shifting."""
        if not scheduler.config.get("use_dynamic_shifting"):
            return None
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        c = scheduler.config
        mu = calculate_shift(self.image_seq_len(shape), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.16))
        return filter_set_timesteps(scheduler, mu=mu)
