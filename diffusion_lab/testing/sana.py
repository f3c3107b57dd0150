"""Tiny random Sana parts and a ``SanaPipeline`` of them, built offline (a few hundred kB).

The real classes with tiny configs, laid out as ``Efficient-Large-Model/Sana_1600M_1024px_diffusers``:

    tokenizer     GemmaTokenizer: Gemma's layout (byte-fallback BPE, spaces as "▁", <bos> added), its merges
                  learned here with the ``tokenizers`` library on the digit captions and the pipeline's
                  complex human instruction, so both are a few tokens a word
    text_encoder  Gemma2Model (hidden 32: the transformer's caption_channels; Sana's is gemma-2-2b-it, 2304)
    vae           AutoencoderDC, 3 stages = down-sampling 4 (Sana's DC-AE has 6 stages = 32): 32 px -> 8x8 x 32
    transformer   SanaTransformer2DModel (linear attention, GLUMBConv, patch 1, no positional embedding)
    scheduler     DPMSolverMultistepScheduler on flow sigmas, flow_shift 3.0: the scheduler Sana ships

    python -m diffusion_lab.tiny_sd outputs/tiny_sana --kind sana

The pipeline resizes requests to its aspect-ratio bins (``use_resolution_binning``) only for the real
``sample_size`` values (16/32/64/128 latents): sample this one with ``use_resolution_binning=False``.
"""

from __future__ import annotations

import functools
import inspect

import torch

# real Sana DC-AE (mit-han-lab/dc-ae-f32c32-sana-1.0): 32 latent channels, latents scaled by 0.41407
SANA_VAE = {"latent_channels": 32, "scaling_factor": 0.41407}
GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # Gemma's ids 0..4


def complex_human_instruction() -> list[str]:
    """``SanaPipeline.__call__``'s default ``complex_human_instruction`` (the prompt prefix it samples with)."""
    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


@functools.lru_cache(maxsize=1)
def _gemma_vocab(vocab_size: int = 1000) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a Gemma-layout BPE learned on the tiny corpus and the instruction: Gemma's
    specials first, then the 256 ``<0xNN>`` byte-fallback tokens (so any text tokenizes), then merges."""
    import json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from diffusion_lab.testing.tiny import CORPUS

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")  # GemmaTokenizer's own normalizer
    # merges learned within words ("▁word" pieces, as Gemma's SentencePiece vocabulary has); GemmaTokenizer applies
    # them to the whole normalized text
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    specials = list(GEMMA_SPECIALS) + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    text = "\n".join(complex_human_instruction()) + "\n" + CORPUS
    tokenizer.train_from_iterator([text, text.lower()], trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return dict(model["vocab"]), merges


def tiny_gemma_tokenizer():
    """A real ``GemmaTokenizer`` (fast) on ``_gemma_vocab``: adds ``<bos>``, pads with ``<pad>`` (id 0)."""
    from transformers import GemmaTokenizer

    vocab, merges = _gemma_vocab()
    return GemmaTokenizer(vocab=dict(vocab), merges=list(merges), add_bos_token=True, add_eos_token=False)


def tiny_gemma2(hidden_size: int = 32, num_hidden_layers: int = 2, seed: int = 0):
    """A random ``Gemma2Model`` (Gemma 2's layout: grouped-query attention, logit soft-capping,
    alternating sliding-window layers) for the tiny tokenizer: states ``[N, L, hidden_size]``."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=len(tiny_gemma_tokenizer()),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=2048,
        sliding_window=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Gemma2Model(config).eval()


def tiny_dc_ae(seed: int = 0, **kwargs):
    """A random ``AutoencoderDC`` with Sana's block types (ResBlocks, then EfficientViT blocks with
    multi-scale linear attention; pixel-unshuffle down, pixel-shuffle up), 3 stages: down-sampling 4."""
    from diffusers import AutoencoderDC

    config = dict(
        in_channels=3,
        attention_head_dim=8,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16, 32),  # the last stage as wide as the latents (the shortcuts reshape channels)
        decoder_block_out_channels=(8, 16, 32),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)),
        **SANA_VAE,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderDC(**{**config, **kwargs})


def tiny_sana_transformer(sample_size: int = 8, in_channels: int = 32, caption_channels: int = 32, seed: int = 0, **kwargs):
    """A random ``SanaTransformer2DModel``: two blocks of width 32 (linear self-attention, cross-attention
    to the Gemma states, GLUMBConv feed-forward), patch 1; ``caption_channels`` = Gemma's hidden size."""
    from diffusers import SanaTransformer2DModel

    config = dict(
        in_channels=in_channels, out_channels=in_channels, num_layers=2, num_attention_heads=2, attention_head_dim=16,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=caption_channels,
        sample_size=sample_size, patch_size=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SanaTransformer2DModel(**{**config, **kwargs})


def sana_scheduler(flow_shift: float = 3.0):
    """The scheduler Sana 1.0 ships: DPM-Solver++ 2M on flow sigmas shifted by ``flow_shift`` (3.0 at 1024 px)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift, solver_order=2,
        algorithm_type="dpmsolver++", solver_type="midpoint", final_sigmas_type="zero", lower_order_final=True,
    )


def tiny_pipeline(resolution: int = 32, seed: int = 0):
    """A ``SanaPipeline`` of tiny random parts for ``resolution`` px images (latents ``resolution / 4``)."""
    from diffusers import SanaPipeline

    vae = tiny_dc_ae(seed=seed)
    f = vae.spatial_compression_ratio
    return SanaPipeline(
        tokenizer=tiny_gemma_tokenizer(),
        text_encoder=tiny_gemma2(seed=seed),
        vae=vae,
        transformer=tiny_sana_transformer(sample_size=resolution // f, in_channels=SANA_VAE["latent_channels"], seed=seed),
        scheduler=sana_scheduler(),
    )
