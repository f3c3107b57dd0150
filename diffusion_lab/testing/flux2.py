"""Tiny random FLUX.2 [klein] parts and ``Flux2KleinPipeline``, built offline (no download).

Real diffusers / transformers classes with tiny configs, the layout of diffusers' own
``tests/pipelines/flux2/test_pipeline_flux2_klein.py`` except where that test downloads or bends the
pipeline's defaults:

- the tokenizer is a real ``Qwen2TokenizerFast`` whose byte-level BPE is learned here with the
  ``tokenizers`` library on ``CORPUS`` (digits_captioned's words), with Qwen3's special tokens and a
  chat template that renders a user turn as Qwen3's does (``enable_thinking=False``: an empty
  ``<think>`` block), so ``encode_prompt`` runs its real code path;
- the ``Qwen3ForCausalLM`` has 27 layers (width 16), so the pipeline's default
  ``text_encoder_out_layers=(9, 18, 27)`` works and ``pipe(prompt)`` needs no extra argument;
- the ``AutoencoderKLFlux2`` carries non-trivial batch-norm running statistics, so the latent
  normalisation ``(z - bn.running_mean) / sqrt(bn.running_var + eps)`` is exercised.

``tiny_pipeline(32).save_pretrained(DIR)`` is a ~1 MB folder that ``DiffusionPipeline.from_pretrained``
loads offline and samples 32x32 images with (``python -m diffusion_lab.tiny_sd DIR --kind flux2``).
"""

from __future__ import annotations

import functools

import torch

# words the tiny tokenizer learns merges for (captions of data=digits_captioned and a few more)
CORPUS = (
    "a handwritten digit zero one two three four five six seven eight nine "
    "a photo of a drawing cartoon character creature dog cat bird with and the in on "
    "red blue green yellow black white small big background user assistant"
)
# Qwen3's special tokens (its tokenizer_config.json): <|endoftext|> pads, <|im_end|> ends a turn
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's chat template reduced to plain messages (no tools, no reasoning content): for one user turn
# with add_generation_prompt=True, enable_thinking=False it renders what Qwen3's renders:
# "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# the real model's hidden-state layers that encode_prompt stacks (the pipeline's default)
OUT_LAYERS = (9, 18, 27)


@functools.lru_cache(maxsize=1)
def _bpe(vocab_size: int = 400) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """(vocab, merges) of a byte-level BPE learned on ``CORPUS`` by the ``tokenizers`` library
    (Qwen2's pre-tokenizer, every byte a token so any text tokenizes)."""
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([CORPUS, CORPUS.replace(" ", "\n")], trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"])
    return tuple(model["vocab"].items()), merges


def tiny_tokenizer(model_max_length: int = 512):
    """A real ``Qwen2TokenizerFast`` (byte-level BPE learned on ``CORPUS``, Qwen3's specials and chat format)."""
    from transformers import Qwen2TokenizerFast

    vocab, merges = _bpe()
    vocab = dict(vocab)
    for token in SPECIALS:
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab, merges=list(merges), unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=model_max_length
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIALS[1:])})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_text_encoder(hidden_size: int = 16, num_hidden_layers: int = max(OUT_LAYERS), seed: int = 0):
    """A random ``Qwen3ForCausalLM`` for ``tiny_tokenizer``: ``num_hidden_layers`` (27 by default, so
    the pipeline's layers 9, 18, 27 exist), tied embeddings (as Qwen3-4B)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = tiny_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden_size // 2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the run's global RNG
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config).eval()


def tiny_vae(latent_channels: int = 4, block_out_channels: tuple[int, ...] = (16, 32), sample_size: int = 32, seed: int = 0):
    """A random ``AutoencoderKLFlux2`` (2 blocks: down-sampling 2; the real one has 4 = 8) whose
    batch-norm running mean / variance over the 2x2-patchified channels are not 0 / 1."""
    from diffusers import AutoencoderKLFlux2

    n = len(block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLFlux2(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=8,
            sample_size=sample_size,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        vae.bn.running_mean.copy_(0.1 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    return vae.eval()


def tiny_transformer(in_channels: int = 16, joint_attention_dim: int = 3 * 16, seed: int = 0, **kwargs):
    """A random ``Flux2Transformer2DModel`` (one double-stream and one single-stream block, width 32,
    RoPE over (t, h, w, l) ids, no guidance embedding as in klein). ``in_channels`` = 4 x the VAE's
    latent channels (2x2 patchified); ``joint_attention_dim`` = 3 stacked layers x the encoder's width."""
    from diffusers import Flux2Transformer2DModel

    config = dict(
        patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=joint_attention_dim, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Flux2Transformer2DModel(**{**config, **kwargs})


def scheduler():
    """FLUX.2's flow-matching scheduler: FLUX.1-dev's saved config (diffusers' ``convert_flux2_to_diffusers.py``
    copies it), ``use_dynamic_shifting``: the pipeline passes ``mu`` from ``compute_empirical_mu``, so the
    base / max shift values are never used by it; training draws from the unshifted table."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )


def tiny_pipeline(resolution: int = 32, seed: int = 0, is_distilled: bool = False):
    """A ``Flux2KleinPipeline`` of tiny random parts (klein *base*: classifier-free guidance;
    ``is_distilled=True``: the step-distilled klein, which ignores ``guidance_scale``)."""
    from diffusers import Flux2KleinPipeline

    vae = tiny_vae(sample_size=resolution, seed=seed)
    encoder = tiny_text_encoder(seed=seed + 1)
    transformer = tiny_transformer(
        in_channels=4 * vae.config.latent_channels, joint_attention_dim=len(OUT_LAYERS) * encoder.config.hidden_size, seed=seed
    )
    return Flux2KleinPipeline(
        scheduler=scheduler(), vae=vae, text_encoder=encoder, tokenizer=tiny_tokenizer(), transformer=transformer, is_distilled=is_distilled
    )
