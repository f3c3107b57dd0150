"""Tiny random Z-Image parts and a ``ZImagePipeline`` of them, built offline (no download).

The layout of diffusers' own fast tests (``tests/pipelines/z_image/test_z_image.py``): a
``ZImageTransformer2DModel`` of width 32 (two main layers, one noise and one context refiner), a
16-channel ``AutoencoderKL`` with FLUX.1's latent scaling and shift (Z-Image uses FLUX.1's VAE), a
random ``Qwen3Model`` and a real ``Qwen2Tokenizer`` (byte-level BPE, as Qwen3's, learned offline with
the ``tokenizers`` library) with Qwen3's special tokens and chat template, which
``ZImagePipeline._encode_prompt`` applies: FLUX.2 klein's tiny tokenizer. The scheduler is the one
Z-Image ships: flow matching with the static shift 3.0.

    python -m diffusion_lab.tiny_sd outputs/tiny_z_image --kind z_image   # tiny_pipeline().save_pretrained
"""

from __future__ import annotations

import torch

from diffusion_lab.testing.tiny import tiny_vae
from diffusion_lab.testing.tiny_mmdit import FLUX_VAE


def tiny_qwen_tokenizer():
    """A real ``Qwen2Tokenizer`` (byte-level BPE learned offline, Qwen3's specials: pad ``<|endoftext|>``,
    end of turn ``<|im_end|>``) with Qwen3's chat template: FLUX.2 klein's tiny one (``testing/flux2.py``)."""
    from diffusion_lab.testing.flux2 import tiny_tokenizer

    return tiny_tokenizer(model_max_length=131072)


def tiny_qwen3(tokenizer=None, hidden_size: int = 32, num_hidden_layers: int = 2, num_attention_heads: int = 2, seed: int = 0):
    """A random ``Qwen3Model`` (the class Z-Image's ``text_encoder/`` holds) for the tiny tokenizer; its
    penultimate hidden states ``[N, L, hidden_size]`` are the transformer's caption features."""
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = tokenizer or tiny_qwen_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen3Model(config)


def tiny_transformer(cap_feat_dim: int = 32, in_channels: int = 16, seed: int = 0, **kwargs):
    """A random ``ZImageTransformer2DModel``: width 32, 2 heads of 16 (RoPE axes 8 + 4 + 4 over
    caption/frame index, row, column), two main layers, one noise and one context refiner, 2x2 patches.
    The pad tokens (``torch.empty`` in diffusers) are set to ones, as diffusers' tests do."""
    from diffusers import ZImageTransformer2DModel

    config = {
        "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": in_channels, "dim": 32, "n_layers": 2, "n_refiner_layers": 1,
        "n_heads": 2, "n_kv_heads": 2, "qk_norm": True, "cap_feat_dim": cap_feat_dim, "axes_dims": [8, 4, 4], "axes_lens": [256, 32, 32],
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel(**{**config, **kwargs})
    with torch.no_grad():
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    return transformer


def scheduler():
    """Z-Image's saved scheduler: flow matching, static shift 3.0 (``use_dynamic_shifting`` false)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def tiny_pipeline(resolution: int = 32, seed: int = 0):
    """A ``ZImagePipeline`` of tiny random parts (about 1 MB): latents ``[16, resolution/2, resolution/2]``."""
    from diffusers import ZImagePipeline

    tokenizer = tiny_qwen_tokenizer()
    return ZImagePipeline(
        transformer=tiny_transformer(seed=seed),
        scheduler=scheduler(),
        vae=tiny_vae(seed=seed, sample_size=resolution, **FLUX_VAE),
        text_encoder=tiny_qwen3(tokenizer, seed=seed + 1),
        tokenizer=tokenizer,
    )
