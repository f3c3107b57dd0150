"""Tiny random Qwen-Image / Qwen-Image-Edit pipelines, built offline (no download).

Real diffusers / transformers classes with tiny configs, laid out as diffusers' own fast tests
(``tests/pipelines/qwenimage/``) lay them out, but with a tokenizer built here instead of fetched:

    tiny_qwen_tokenizer()            a real ``Qwen2Tokenizer`` (byte-level BPE, Qwen's pre-tokenizer regex)
                                     whose merges are learned offline by the ``tokenizers`` library on
                                     ``CORPUS``: the digit captions and every word of the pipelines'
                                     prompt templates, so the templates' prefixes are 34 (text) and 64
                                     (edit) tokens long, as the pipelines' ``prompt_template_encode_start_idx``
                                     assumes (the real Qwen2.5 tokenizer's counts), plus the chat specials
    tiny_qwen_text_encoder()         a random ``Qwen2_5_VLForConditionalGeneration`` (text and vision towers)
    tiny_qwen_vae()                  a random ``AutoencoderKLQwenImage`` (z_dim 4, 4x down-sampling)
    tiny_qwen_transformer()          a random ``QwenImageTransformer2DModel`` (two blocks, width 32)
    tiny_pipeline(resolution, seed)  the ``QwenImagePipeline`` of these parts (``--kind qwen_image``)

``testing/qwen_image_edit.py`` builds the ``QwenImageEditPipeline`` of the same parts.
"""

from __future__ import annotations

import functools

import torch

from diffusion_lab.testing.tiny import CORPUS

# QwenImagePipeline.prompt_template_encode and QwenImageEditPipeline's, whose prefixes the pipelines drop
TEMPLATE_WORDS = (
    "system Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of "
    "the objects and background: user assistant "
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then explain how "
    "the user's text instruction should alter or modify the image. Generate a new image that meets the user's "
    "requirements while maintaining consistency with the original input where appropriate. "
    "make it turn into change replace add remove thicker thinner bold"  # a few edit instructions
)
# Qwen2.5's chat and vision specials (the real vocabulary's 151643.. ids, here after the learned tokens)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# Qwen-Image's VAE latent statistics (AutoencoderKLQwenImage's defaults, 16 channels): the tiny VAEs take the first
# z_dim of them, non-trivial mean / std, so the codec's (z - mean) / std is exercised
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


@functools.lru_cache(maxsize=1)
def _qwen_bpe() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """(vocab, merges) of a byte-level BPE with Qwen2's pre-tokenizer, learned on ``CORPUS`` and the
    template words until every word (with its leading space) is one token."""
    import json

    from tokenizers import (
        Regex,
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=[SPECIALS[0]], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    words = f"{CORPUS} {TEMPLATE_WORDS}"
    # each word once at a line start and once after a space, so both spellings (Ġword and word) merge fully
    tokenizer.train_from_iterator([words, "\n".join(words.split())], trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"])
    return tuple(model["vocab"].items()), merges


def tiny_qwen_tokenizer(model_max_length: int = 32768):
    """A real ``Qwen2Tokenizer`` (transformers 5's fast one) on the BPE learned offline, with Qwen2.5's
    specials as special added tokens (``<|im_start|>``, ``<|im_end|>``, the vision tokens)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _qwen_bpe()
    tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS[1:]], special_tokens=True)
    return tokenizer


def tiny_qwen_text_encoder(tokenizer=None, hidden_size: int = 32, num_hidden_layers: int = 2, seed: int = 0):
    """A random ``Qwen2_5_VLForConditionalGeneration`` for ``tokenizer`` (Qwen-Image's text encoder is the
    whole VL model: its language model's last hidden states condition the transformer, and the edit
    pipeline runs the vision tower on the source image). Two heads (M-RoPE's temporal, height and width
    sections share half a head: 2+3+3 for 16-wide heads), a one-block vision tower projecting to ``hidden_size``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tokenizer or tiny_qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    half, hw = hidden_size // 4, hidden_size * 3 // 32  # half a head of hidden_size / 2; its height and width sections
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_hidden_layers,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "mrope_section": [half - 2 * hw, hw, hw], "rope_theta": 1000000.0},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden_size, fullatt_block_indexes=[0], window_size=56),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_vae(z_dim: int = 4, base_dim: int = 8, dim_mult: tuple[int, ...] = (1, 2, 4), seed: int = 0):
    """A random ``AutoencoderKLQwenImage``: causal-3D convolutions, 4x spatial down-sampling (the real one:
    16 channels, 8x; widths 8-16-32 here, 96-192-384-384 there), images are one-frame videos ``[N, 3, 1, H, W]``.
    Each ``dim_mult`` level after the first halves the size (the real VAE's ``temperal_downsample`` layout)."""
    from diffusers import AutoencoderKLQwenImage

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLQwenImage(
            base_dim=base_dim, z_dim=z_dim, dim_mult=list(dim_mult), num_res_blocks=1, temperal_downsample=[False] + [True] * (len(dim_mult) - 2),
            latents_mean=LATENTS_MEAN[:z_dim], latents_std=LATENTS_STD[:z_dim],
        )


def tiny_qwen_transformer(z_dim: int = 4, joint_attention_dim: int = 32, zero_cond_t: bool = False, seed: int = 0, **kwargs):
    """A random ``QwenImageTransformer2DModel`` (MMDiT, two double-stream blocks of width 2 x 16, RoPE
    (frame, row, column) 4+6+6 = the head width); ``in_channels`` = 4 x z_dim (2x2 latent patches packed
    into tokens). ``zero_cond_t``: Qwen-Image-Edit-2511's reference-token modulation."""
    from diffusers import QwenImageTransformer2DModel

    config = dict(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=joint_attention_dim, guidance_embeds=False, axes_dims_rope=(4, 6, 6), zero_cond_t=zero_cond_t,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return QwenImageTransformer2DModel(**{**config, **kwargs})


def qwen_scheduler():
    """Qwen-Image's saved scheduler (``scheduler/scheduler_config.json`` of Qwen/Qwen-Image): flow matching
    with the resolution shift mu computed per image size (exponential time shift, ``base_shift`` 0.5 at 256
    tokens to ``max_shift`` 0.9 at 8192, ``shift_terminal`` 0.02)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )


def tiny_pipeline(resolution: int = 32, seed: int = 0):
    """A ``QwenImagePipeline`` of tiny random parts (a few MB). ``resolution`` is the size it is meant to be
    sampled at (any multiple of 8 works: VAE 4x, then 2x2 packing)."""
    from diffusers import QwenImagePipeline

    tokenizer = tiny_qwen_tokenizer()
    return QwenImagePipeline(
        transformer=tiny_qwen_transformer(seed=seed),
        scheduler=qwen_scheduler(),
        vae=tiny_qwen_vae(seed=seed),
        text_encoder=tiny_qwen_text_encoder(tokenizer, seed=seed),
        tokenizer=tokenizer,
    )

