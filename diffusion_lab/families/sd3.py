"""Stable Diffusion 3 / 3.5 (Esser et al. 2024): rectified flow on 16-channel VAE latents with an
MMDiT (``SD3Transformer2DModel``) attending jointly over image patches and the text states of three
encoders (``components/text_mmdit.SD3TextConditioner``, exactly ``StableDiffusion3Pipeline.encode_prompt``).
Trained by flow matching on the pipeline's own shifted schedule; exports a ``StableDiffusion3Pipeline``.
Trains as diffusers' ``examples/dreambooth/train_dreambooth_lora_sd3.py`` does (full or LoRA)."""

from __future__ import annotations

import torch

from diffusion_lab.components.mmdit import check_transformer_parts
from diffusion_lab.families.base import Family, control_latents, filter_set_timesteps


class StableDiffusion3(Family):
    name = "latent_sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    controlnet_pipeline_class = "StableDiffusion3ControlNetPipeline"
    encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    text_keys = ("encoder_hidden_states", "pooled_projections")
    # adapter=textual_inversion: both CLIPs learn the token (and T5 with adapter.t5); StableDiffusion3Pipeline has no
    # load_textual_inversion: export/embeddings.load_embeddings runs diffusers' loader on each encoder
    refuses = {"textual_inversion": None}
    # 2x2 latent patches packed into the channels (FLUX); 1 = the latents as they are
    packing = 1

    def check_parts(self, backbone, codec, conditioner, resolution: int, image_channels: int) -> None:
        """Also gives a conditioner without T5 the width of the zeros that replace T5's states."""
        if getattr(conditioner, "joint_attention_dim", False) is None:
            conditioner.joint_attention_dim = int(backbone.config.joint_attention_dim)
        check_transformer_parts(self.name, backbone, codec, conditioner, resolution, image_channels, self.packing)

    def lora_text_encoders(self, conditioner) -> tuple[torch.nn.Module, ...]:
        """The CLIP encoders: the pipelines' LoRA loaders have no T5 slot."""
        return tuple(conditioner.clip_encoders)

    def text_states(self, conditioner, captions: list[str]) -> dict[str, torch.Tensor]:
        states, pooled = conditioner(captions)
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    def forward(self, backbone, x_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states, pooled_projections, **controls) -> torch.Tensor:
        """Latents at timesteps ``t`` = sigma x 1000 (the pipeline's) -> velocity."""
        return backbone(hidden_states=x_t, timestep=t, encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections, **controls).sample

    def control_input(self, module, images: torch.Tensor) -> torch.Tensor:
        """The control image's VAE latents, scaled and shifted as the latents themselves
        (``StableDiffusion3ControlNetPipeline.prepare_image``; here the posterior mean)."""
        return control_latents(module, images)

    def image_seq_len(self, backbone, shape: tuple[int, ...]) -> int:
        """Image tokens of latents ``[N, c, h, w]``: (h / p) (w / p) for patch size p (x the packing)."""
        p = int(backbone.config.patch_size) * self.packing
        return (shape[-2] // p) * (shape[-1] // p)

    def sampling_schedule(self, backbone, scheduler, shape, num_inference_steps):
        """The scheduler's own sigmas; ``mu`` only with dynamic shifting (``StableDiffusion3Pipeline``)."""
        if not scheduler.config.get("use_dynamic_shifting"):
            return None
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        c = scheduler.config
        mu = calculate_shift(self.image_seq_len(backbone, shape), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.16))
        return filter_set_timesteps(scheduler, mu=mu)

    def pipeline_parts(self, backbone, vae, scheduler, encoders, tokenizers) -> dict:
        """Trained without T5: the pipeline puts zeros in its place too."""
        parts = super().pipeline_parts(backbone, vae, scheduler, encoders, tokenizers)
        parts.setdefault("text_encoder_3", None)
        parts.setdefault("tokenizer_3", None)
        return parts
