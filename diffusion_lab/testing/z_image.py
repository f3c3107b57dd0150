"""Tiny random Z-Image parts and a ``ZImagePipeline`` of them, built offline (no download).

The layout of diffusers' own fast tests (``tests/pipelines/z_image/test_z_image.py``): a
``ZImageTransformer2DModel`` of width 32 (two main layers, one noise and one context refiner), a
16-channel ``AutoencoderKL`` with FLUX.1's latent scaling and shift (Z-Image uses FLUX.1's VAE), a
random ``Qwen3Model`` and a real ``Qwen2Tokenizer`` (byte-level BPE, as Qwen3's) whose merges are
learned offline with the ``tokenizers`` library on a small corpus, with Qwen3's special tokens and
its chat template (``ZImagePipeline._encode_prompt`` applies it). The scheduler is the one Z-Image
ships: flow matching with the static shift 3.0.

    python -m diffusion_lab.tiny_sd outputs/tiny_z_image --kind z_image   # tiny_pipeline().save_pretrained
"""

from __future__ import annotations

import functools
import json

import torch

from diffusion_lab.components.tiny import CORPUS, FLUX_VAE, tiny_vae

# Qwen3's special tokens: pad (and unknown), the chat turns' delimiters; <think> </think> are plain added tokens
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_THINK = ("<think>", "</think>")

# Qwen3's chat template reduced to what ZImagePipeline uses (text messages, add_generation_prompt,
# enable_thinking): "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", plus an empty
# think block when enable_thinking is false, as Qwen3's own template renders it
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


@functools.lru_cache(maxsize=1)
def _qwen_bpe(vocab_size: int = 420) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(vocab JSON, merges) of a byte-level BPE learned on ``CORPUS`` and the chat roles, with
    ``Qwen2Tokenizer``'s own pre-tokenizer (its regex split, then byte-level)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(QWEN_SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = [CORPUS, "user assistant system", "user\n" + CORPUS + "\nassistant\n"]
    tokenizer.train_from_iterator(corpus, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"])
    return json.dumps(model["vocab"]), merges


def tiny_qwen_tokenizer():
    """A real ``Qwen2Tokenizer`` (byte-level BPE learned offline, Qwen3's specials: pad ``<|endoftext|>``,
    end of turn ``<|im_end|>``) with Qwen3's chat template."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _qwen_bpe()
    tokenizer = Qwen2Tokenizer(
        vocab=json.loads(vocab), merges=list(merges), unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=131072
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_THINK])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


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

    config = dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=in_channels, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, qk_norm=True, cap_feat_dim=cap_feat_dim, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )
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
