"""Tiny random SD3 and FLUX.1 parts and pipelines (``testing/tiny.py``'s ``build(kind="sd3"|"flux")``):
MMDiT transformers (``backbone=sd3_tiny|flux_tiny``), flow-matching schedulers, and a T5 encoder whose
real ``T5TokenizerFast`` has a unigram vocabulary learned offline with the ``tokenizers`` library
(``testing/vocab.t5_vocab``); the CLIP encoders and VAE are ``testing/tiny.py``'s."""

from __future__ import annotations

import functools

import torch

from diffusion_lab.testing.tiny import CORPUS, tiny_clip_tokenizer, tiny_text_encoder, tiny_vae
from diffusion_lab.testing.vocab import t5_text_encoder, t5_tokenizer


@functools.lru_cache(maxsize=1)
def _t5_vocab_words() -> tuple[str, ...]:
    return tuple(CORPUS.split())


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A real ``T5TokenizerFast`` (unigram vocabulary learned on ``CORPUS``, ``testing/vocab.py``)."""
    return t5_tokenizer(_t5_vocab_words(), vocab_size=200, model_max_length=model_max_length)


def tiny_t5_encoder(d_model: int = 64, seed: int = 0):
    """A random ``T5EncoderModel`` sized for the tiny T5 tokenizer."""
    return t5_text_encoder(tiny_t5_tokenizer(), d_model, seed=seed)


# latent statistics of the real SD3 / Flux VAEs (16 channels, no quant convs): the tiny VAEs carry
# the same scaling and shift, so the codec's (z - shift) * scale is exercised with a non-zero shift
SD3_VAE = {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False}
FLUX_VAE = {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}


def tiny_sd3_transformer(sample_size: int = 16, in_channels: int = 16, joint_attention_dim: int = 96, pooled_projection_dim: int = 64, seed: int = 0, **kwargs):
    """A random ``SD3Transformer2DModel`` in SD3.5-medium's layout (patch 2, QK RMS-norm, a dual-attention
    first block), two blocks of width 32."""
    from diffusers import SD3Transformer2DModel

    config = dict(
        sample_size=sample_size, patch_size=2, in_channels=in_channels, out_channels=in_channels, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=joint_attention_dim, caption_projection_dim=32, pooled_projection_dim=pooled_projection_dim,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SD3Transformer2DModel(**{**config, **kwargs})


def tiny_flux_transformer(in_channels: int = 64, joint_attention_dim: int = 64, pooled_projection_dim: int = 32, guidance_embeds: bool = True, seed: int = 0, **kwargs):
    """A random ``FluxTransformer2DModel`` (one double-stream and one single-stream block, width 32,
    RoPE over (text, row, column) ids; ``guidance_embeds``: FLUX.1-dev's distilled guidance input).
    ``in_channels`` = 4 x VAE latent channels (2x2 latent patches are packed into tokens)."""
    from diffusers import FluxTransformer2DModel

    config = dict(
        patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=joint_attention_dim, pooled_projection_dim=pooled_projection_dim, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxTransformer2DModel(**{**config, **kwargs})


def sd3_scheduler():
    """SD3 / SD3.5's saved scheduler: flow matching with the static resolution shift 3.0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def flux_scheduler():
    """FLUX.1-dev's saved scheduler: flow matching with the resolution shift computed per image size
    (``use_dynamic_shifting``: mu from the token count, ``base_shift`` at 256 tokens to ``max_shift`` at 4096)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )


def tiny_sd3_pipeline(resolution: int = 32, seed: int = 0, t5: bool = True):
    """A ``StableDiffusion3Pipeline`` of tiny random parts: CLIP-L and CLIP-G with projection (hidden
    32 each: 64-wide pooled projections), T5 (64 + 32 wide, so the CLIP states are zero-padded to it as
    in SD3), the SD3.5-layout transformer; ``t5=False``: no third encoder (zeros in its place)."""
    from diffusers import StableDiffusion3Pipeline

    vae = tiny_vae(seed=seed, sample_size=resolution, **SD3_VAE)
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(sample_size=resolution // 2, seed=seed),
        scheduler=sd3_scheduler(),
        vae=vae,
        text_encoder=tiny_text_encoder(32, with_projection=True, seed=seed),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_text_encoder(32, with_projection=True, seed=seed + 1),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(96, seed=seed + 2) if t5 else None,
        tokenizer_3=tiny_t5_tokenizer() if t5 else None,
    )


def tiny_flux_pipeline(resolution: int = 32, seed: int = 0, guidance_embeds: bool = True):
    """A ``FluxPipeline`` of tiny random parts: CLIP (pooled, hidden 32), T5 (states, 64 wide), the
    transformer (``guidance_embeds``: FLUX.1-dev's distilled guidance; false: schnell's layout)."""
    from diffusers import FluxPipeline

    return FluxPipeline(
        transformer=tiny_flux_transformer(guidance_embeds=guidance_embeds, seed=seed),
        scheduler=flux_scheduler(),
        vae=tiny_vae(seed=seed, sample_size=resolution, **FLUX_VAE),
        text_encoder=tiny_text_encoder(32, seed=seed),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_t5_encoder(64, seed=seed + 1),
        tokenizer_2=tiny_t5_tokenizer(),
    )
