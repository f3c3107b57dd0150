"""Tiny random Stable Diffusion parts and pipelines, built offline, for tests and benchmarks.

Real diffusers/transformers classes with tiny configs, and a real ``CLIPTokenizer`` whose
byte-level BPE vocab/merges are learned from a small caption corpus (``testing/vocab.py``, no
download). These functions are the ``_target_`` of ``vae=tiny``, ``text_encoder=tiny`` and
``backbone=sd_tiny``, and ``build`` saves the same models as a pipeline folder
(``python -m diffusion_lab.tiny_sd``), so the folder and the config groups are the same models.
SD3 and Flux pipelines (``--kind sd3|flux``) are ``testing/tiny_mmdit.py``'s.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import torch

from diffusion_lab.testing.vocab import clip_text_encoder, clip_vocab

# words the tiny tokenizer learns merges for (captions of data=digits_captioned and a few more)
CORPUS = (
    "a handwritten digit zero one two three four five six seven eight nine "
    "a photo of a drawing cartoon pokemon character creature dragon bird cat dog with and the "
    "red blue green yellow orange purple pink black white small big eyes wings tail background"
)


@functools.lru_cache(maxsize=1)
def _tokenizer_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the tiny tokenizer: byte-level BPE learned on ``CORPUS``."""
    return clip_vocab(CORPUS.split(), num_merges=200)


def tiny_clip_tokenizer(model_max_length: int = 77):
    """A real ``CLIPTokenizer`` (byte-level BPE, 512 byte tokens + learned merges + specials)."""
    from transformers import CLIPTokenizer

    vocab, merges = _tokenizer_files()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


def tiny_text_encoder(hidden_size: int = 32, num_hidden_layers: int = 2, num_attention_heads: int = 4, with_projection: bool = False, seed: int = 0):
    """A random ``CLIPTextModel`` (or ``...WithProjection`` for SDXL's second encoder) sized for the tiny tokenizer."""
    return clip_text_encoder(tiny_clip_tokenizer(), hidden_size, num_hidden_layers, num_attention_heads, with_projection, seed)


def tiny_vae(latent_channels: int = 4, block_out_channels: Sequence[int] = (16, 32), layers_per_block: int = 1, seed: int = 0, **kwargs):
    """A random ``AutoencoderKL``: 2 blocks = down-sampling 2 (SD's has 4 blocks = 8)."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the run's global RNG
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=latent_channels,
            block_out_channels=tuple(block_out_channels),
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            layers_per_block=layers_per_block,
            norm_num_groups=8,
            **kwargs,
        )


def tiny_unet(sample_size: int = 16, in_channels: int = 4, cross_attention_dim: int = 32, block_out_channels: Sequence[int] = (32, 64), seed: int = 0, **kwargs):
    """A random ``UNet2DConditionModel`` with SD's block layout, two levels."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the run's global RNG
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            layers_per_block=1,
            block_out_channels=tuple(block_out_channels),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
            norm_num_groups=16,
            **kwargs,
        )


def sd_scheduler(prediction_type: str = "epsilon"):
    """SD 1.x's noise schedule (scaled_linear 0.00085..0.012) and sampler (PNDM, as shipped)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


# A VAE whose encoder costs what SD 1.5's costs relative to its UNet: SD's VAE encoder at 512 px is
# 0.46x the FLOPs of a UNet training step at 64x64 latents (experiments/bench/sd15_flops.py); this
# one (SD's 2 layers per block, 32-64 channels) is 0.42x the tiny UNet's at 16 px. The default
# (16-32, 1 layer) is 0.07x: cheap for tests, but it hides what latent caching saves.
SD15_SPLIT_VAE = {"block_out_channels": (32, 64), "layers_per_block": 2}


def tiny_sd_pipeline(resolution: int = 32, prediction_type: str = "epsilon", seed: int = 0, vae_kwargs: dict | None = None):
    """A ``StableDiffusionPipeline`` of tiny random parts, safety checker off. ``vae_kwargs``
    (e.g. ``SD15_SPLIT_VAE``) reshape the VAE."""
    from diffusers import StableDiffusionPipeline

    vae = tiny_vae(seed=seed, sample_size=resolution, **(vae_kwargs or {}))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=tiny_text_encoder(seed=seed),
        tokenizer=tiny_clip_tokenizer(),
        unet=tiny_unet(sample_size=resolution // 2, seed=seed),
        scheduler=sd_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(refiner: bool = False, resolution: int = 32, seed: int = 0):
    """SDXL base (two text encoders, ``text_time`` added conditioning) or refiner (second
    encoder only, aesthetic-score time ids), the layout of diffusers' own SDXL fast tests."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    hidden, time_dim = 32, 8
    # added conditioning = time ids (6 base / 5 refiner, each time_dim wide) + pooled text (hidden)
    n_time_ids = 5 if refiner else 6
    unet = tiny_unet(
        sample_size=resolution // 2,
        cross_attention_dim=hidden if refiner else 2 * hidden,
        seed=seed,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=n_time_ids * time_dim + hidden,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    parts = dict(
        vae=tiny_vae(seed=seed, sample_size=resolution, force_upcast=False),
        unet=unet,
        scheduler=scheduler,
        text_encoder_2=tiny_text_encoder(hidden, with_projection=True, seed=seed + 1),
        tokenizer_2=tiny_clip_tokenizer(),
    )
    if refiner:
        return StableDiffusionXLImg2ImgPipeline(**parts, text_encoder=None, tokenizer=None, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    return StableDiffusionXLPipeline(**parts, text_encoder=tiny_text_encoder(hidden, seed=seed), tokenizer=tiny_clip_tokenizer())


BUILT_IN = ("sd", "sdxl", "sdxl-refiner", "sd3", "flux")
PARTS = ("tiny", "tiny_mmdit", "vocab")  # modules of testing/ that build parts, not a family's pipeline


def kinds() -> list[str]:
    """Every ``--kind``: the built-in ones and each family with a builder in ``diffusion_lab/testing/<kind>.py``."""
    import diffusion_lab.testing as testing

    return [*BUILT_IN, *sorted(p.stem for p in Path(testing.__file__).parent.glob("*.py") if not p.stem.startswith("_") and p.stem not in PARTS)]


def build(out: str | Path, kind: str = "sd", prediction_type: str = "epsilon", resolution: int = 32, seed: int = 0, vae_kwargs: dict | None = None) -> Path:
    """Build the tiny pipeline of ``kind`` and ``save_pretrained`` it to ``out``."""
    from diffusion_lab.utils.io import atomic_dir

    if kind == "sd":
        pipe = tiny_sd_pipeline(resolution, prediction_type, seed, vae_kwargs)
    elif kind in ("sdxl", "sdxl-refiner"):
        pipe = tiny_sdxl_pipeline(refiner=kind == "sdxl-refiner", resolution=resolution, seed=seed)
    elif kind in ("sd3", "flux"):
        from diffusion_lab.testing import tiny_mmdit

        pipe = tiny_mmdit.tiny_sd3_pipeline(resolution, seed) if kind == "sd3" else tiny_mmdit.tiny_flux_pipeline(resolution, seed)
    elif kind in kinds():  # a family's own builder: diffusion_lab/testing/<kind>.py
        import importlib

        pipe = importlib.import_module(f"diffusion_lab.testing.{kind}").tiny_pipeline(resolution=resolution, seed=seed)
    else:
        raise ValueError(f"kind must be one of {', '.join(kinds())}; got {kind!r}")
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for sub in ("tokenizer", "tokenizer_2"):
            if _is_clip_tokenizer(Path(tmp) / sub):  # Flux's tokenizer_2 is T5's
                write_vocab_files(Path(tmp) / sub)
    return Path(out)


def _is_clip_tokenizer(folder: Path) -> bool:
    import json

    config = folder / "tokenizer_config.json"
    return config.is_file() and "CLIP" in json.loads(config.read_text()).get("tokenizer_class", "")


def write_vocab_files(folder: Path) -> None:
    """``vocab.json`` + ``merges.txt`` beside ``tokenizer.json``: the files SD repos ship, which
    older transformers (slow ``CLIPTokenizer``) and other tools read."""
    import json

    vocab, merges = _tokenizer_files()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
