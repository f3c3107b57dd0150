"""Tiny random Chroma parts and a ``ChromaPipeline`` of them, built offline (no download).

Chroma (lodestones/Chroma1-HD) is FLUX.1-schnell's layout with the per-block modulation replaced by
one small MLP (the "approximator", ``distilled_guidance_layer``) and no CLIP: T5 only, with an
attention mask. The tiny parts reuse FLUX's tiny VAE (16 channels, FLUX's scaling and shift),
T5 encoder and ``T5TokenizerFast`` (``testing/tiny.py``), so a Chroma folder and a FLUX folder
differ exactly where the real models do.

    tiny_pipeline(32).save_pretrained(DIR)     # python -m diffusion_lab.tiny_sd DIR --kind chroma
"""

from __future__ import annotations

import torch

from diffusion_lab.testing.tiny import tiny_vae
from diffusion_lab.testing.tiny_mmdit import FLUX_VAE, flux_scheduler, tiny_t5_encoder, tiny_t5_tokenizer


def tiny_transformer(in_channels: int = 64, joint_attention_dim: int = 64, seed: int = 0, **kwargs):
    """A random ``ChromaTransformer2DModel``: one double- and one single-stream block of width 32, RoPE over
    (text, row, column) ids as FLUX.1, a 2-layer approximator. ``in_channels`` = 4 x VAE latent channels
    (2x2 latent patches packed into tokens); ``joint_attention_dim`` = the T5's ``d_model``."""
    from diffusers import ChromaTransformer2DModel

    config = dict(
        patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=joint_attention_dim, axes_dims_rope=(4, 6, 6), approximator_num_channels=16, approximator_hidden_dim=32,
        approximator_layers=2,
    )
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the run's global RNG
        torch.manual_seed(seed)
        return ChromaTransformer2DModel(**{**config, **kwargs})


def tiny_pipeline(resolution: int = 32, seed: int = 0):
    """A ``ChromaPipeline`` of tiny random parts (about 1 MB): T5 (64 wide) + tokenizer, the transformer,
    FLUX's VAE layout and FLUX.1-dev's dynamically shifted flow-matching scheduler (the pipeline computes
    ``mu`` from the token count and passes it to ``set_timesteps``)."""
    from diffusers import ChromaPipeline

    return ChromaPipeline(
        transformer=tiny_transformer(seed=seed),
        scheduler=flux_scheduler(),
        vae=tiny_vae(seed=seed, sample_size=resolution, **FLUX_VAE),
        text_encoder=tiny_t5_encoder(64, seed=seed + 1),
        tokenizer=tiny_t5_tokenizer(),
    )
