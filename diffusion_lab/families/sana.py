"""Sana (Xie et al. 2024, NVIDIA): a linear-attention DiT (``SanaTransformer2DModel``: ReLU linear self-attention,
cross-attention to text, GLUMBConv feed-forward, no positional embedding) on the latents of a deep-compression
autoencoder (``AutoencoderDC``: 32x down-sampling, 32 channels, deterministic: no posterior), conditioned on
the last hidden states of a decoder-only LLM (Gemma 2, ``Gemma2Model``) prompted with a "complex human
instruction". Trained by flow matching (flow shift 3.0, logit-normal timesteps in Sana's own configs); sampled
with classifier-free guidance by ``SanaPipeline`` (DPM-Solver++ on flow sigmas, guidance 4.5, 20 steps).

    SanaTextConditioner   SanaPipeline.encode_prompt / _get_gemma_prompt_embeds
    DCAECodec             AutoencoderDC's encode(...).latent * scaling_factor, decode(z / scaling_factor)
    Sana.forward          the transformer call of SanaPipeline.__call__ (timestep x timestep_scale, the mask)
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from diffusion_lab.components.pretrained import Dtype
from diffusion_lab.components.text import TextConditioner
from diffusion_lab.components.vae import VAECodec
from diffusion_lab.families.base import Family, control_latents
from diffusion_lab.utils.errors import ConfigError


def pipeline_instruction() -> list[str]:
    """``SanaPipeline.__call__``'s default ``complex_human_instruction``: what the pipeline samples with."""
    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


class SanaTextConditioner(TextConditioner):
    """Gemma 2's last hidden states, exactly as ``SanaPipeline.encode_prompt`` computes them.

    A caption is lower-cased and stripped (``_text_preprocessing``, ``clean_caption=False``), prefixed with the
    instruction, tokenized right-padded to ``instruction tokens + max_sequence_length - 2``, encoded with the
    attention mask, and of the states and mask only ``<bos>`` and the last ``max_sequence_length - 1``
    positions are kept (``select_index``, the paper's sec. 3.1): ``[N, max_sequence_length, D]``. The empty
    caption is encoded as the pipeline's negative prompt "": without instruction, ``max_sequence_length``
    tokens. Every caption thus gives the same fixed length, so batches, cached states and the two halves of
    classifier-free guidance concatenate; the transformer ignores the padding through the mask.

    Args:
        tokenizer: ``GemmaTokenizer`` (the pipeline's ``tokenizer/``).
        text_encoder: ``Gemma2Model`` (``text_encoder/``); its ``hidden_size`` is the transformer's ``caption_channels``.
        max_sequence_length: text tokens (the pipeline's ``max_sequence_length``, 300).
        complex_human_instruction: "pipeline" (the lines ``SanaPipeline`` samples with by default), a list of
            lines, or null / [] for none (diffusers' ``train_dreambooth_lora_sana.py`` default).
        trainable, dtype: as ``TextConditioner``.
    """

    def __init__(
        self,
        tokenizer,
        text_encoder: torch.nn.Module,
        max_sequence_length: int = 300,
        complex_human_instruction: str | Sequence[str] | None = "pipeline",
        trainable: bool = False,
        dtype: Dtype = "float32",
    ) -> None:
        super().__init__(tokenizer, text_encoder, trainable, dtype)
        if isinstance(complex_human_instruction, str):
            if complex_human_instruction != "pipeline":
                raise ConfigError(f"text_encoder.complex_human_instruction={complex_human_instruction!r}: use pipeline, a list of lines, or null.")
            complex_human_instruction = pipeline_instruction()
        self.complex_human_instruction = list(complex_human_instruction or [])
        self.max_sequence_length = int(max_sequence_length)

    def _gemma(self, captions: list[str], instruction: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``_get_gemma_prompt_embeds`` + ``encode_prompt``'s ``select_index`` for the instruction-prefixed
        captions -> (states ``[N, M, D]``, mask ``[N, M]``), M = ``max_sequence_length``."""
        m = self.max_sequence_length
        self.tokenizer.padding_side = "right"
        length = m
        if instruction:
            prefix = "\n".join(instruction)
            captions = [prefix + c for c in captions]
            length = len(self.tokenizer.encode(prefix)) + m - 2
        tokens = self.tokenizer(captions, padding="max_length", max_length=length, truncation=True, add_special_tokens=True, return_tensors="pt")
        device = self.text_encoder.device
        mask = tokens.attention_mask.to(device)
        states = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        if instruction:
            select = [0] + list(range(-m + 1, 0))
            states, mask = states[:, select], mask[:, select]
        return states, mask

    def forward(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions -> ``encoder_hidden_states`` ``[N, M, D]`` (fp32) and ``encoder_attention_mask`` ``[N, M]`` (int64)."""
        captions = [c.lower().strip() for c in captions]  # _text_preprocessing(clean_caption=False)
        empty = [i for i, c in enumerate(captions) if not c]
        full = [i for i, c in enumerate(captions) if c]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            states = mask = None
            for idx, instruction in ((full, self.complex_human_instruction), (empty, [])):
                if not idx:
                    continue
                s, k = self._gemma([captions[i] for i in idx], instruction)
                if len(idx) == len(captions):
                    states, mask = s, k
                    break
                if states is None:
                    states = s.new_zeros(len(captions), *s.shape[1:])
                    mask = k.new_zeros(len(captions), *k.shape[1:])
                states[idx], mask[idx] = s, k
            return {"encoder_hidden_states": states.float(), "encoder_attention_mask": mask}


class DCAECodec(VAECodec):
    """A frozen ``AutoencoderDC`` (Chen et al. 2024, "Deep Compression Autoencoder"): deterministic latents
    ``z = E(x) * scaling_factor``, images ``D(z / scaling_factor)``, as ``SanaPipeline`` and diffusers'
    ``train_dreambooth_lora_sana.py`` use it. It has no posterior: ``moments`` are the latents themselves.

    Args:
        vae: the ``AutoencoderDC``.
        dtype: dtype it is held in (diffusers' Sana script keeps it in float32).
    """

    def __init__(self, vae: torch.nn.Module, dtype: Dtype = "float32") -> None:
        super().__init__(vae, sample_posterior=False, dtype=dtype)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side: ``2 ** (stages - 1)`` (32 for Sana's DC-AE)."""
        return int(self.vae.spatial_compression_ratio)

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` in [-1, 1] -> unscaled latents ``[N, c, h, w]`` (fp32, cacheable)."""
        latent = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent
        return latent.to(images.device, torch.float32).contiguous()

    def latents(self, moments: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Unscaled latents -> diffusion-space latents (``sample`` is ignored: nothing to sample)."""
        return (moments - self.shift_factor) * self.scaling_factor


# ---- loading a Sana pipeline folder ---------------------------------------------------------------------


# ---- the family -------------------------------------------------------------------------------------------
TEXTUAL_INVERSION = (
    "textual inversion needs a text encoder with an embedding table it can grow and a loader for the learned "
    "tokens; Sana's Gemma 2 is read through a complex-human-instruction prompt and SanaPipeline has no "
    "load_textual_inversion: fine-tune or use adapter=lora instead."
)


class Sana(Family):
    """``SanaTransformer2DModel`` on DC-AE latents ``[N, 32, H/32, W/32]`` (no packing), conditioned on Gemma 2
    states with their attention mask; classifier-free guidance against the encoded "" (``SanaPipeline``).
    Exports a ``SanaPipeline``; LoRA files through ``SanaPipeline.save_lora_weights`` (transformer only:
    ``SanaLoraLoaderMixin`` has no text-encoder slot)."""

    name = "latent_sana"
    pipeline_class = "SanaPipeline"
    controlnet_pipeline_class = "SanaControlNetPipeline"
    text_keys = ("encoder_hidden_states", "encoder_attention_mask")
    refuses = {
        "textual_inversion": TEXTUAL_INVERSION,
        "edit": "Sana has no instruction-edit pipeline in diffusers to export to; use an edit family.",
    }

    def check_parts(self, backbone, codec, conditioner, resolution: int, image_channels: int) -> None:
        """Latent channels == the transformer's in/out channels; Gemma's width == ``caption_channels``;
        ``data.resolution`` divisible by 32 (``SanaPipeline.check_inputs``) and by the VAE factor x patch."""
        cfg, problems = backbone.config, []
        for key in ("in_channels", "out_channels"):
            value = cfg.get(key) or cfg.in_channels
            if value not in (codec.latent_channels, 2 * codec.latent_channels if key == "out_channels" else -1):
                problems.append(f"backbone.{key}={value} does not match vae.latent_channels={codec.latent_channels}: use the VAE of the same model.pretrained.")
        if cfg.caption_channels != conditioner.hidden_size:
            problems.append(
                f"backbone.caption_channels={cfg.caption_channels} does not match the text_encoder hidden size {conditioner.hidden_size}: "
                "use the text encoder of the same model.pretrained as the transformer."
            )
        factor = codec.downsample_factor * int(cfg.patch_size)
        step = max(32, factor)
        if resolution % step:
            problems.append(
                f"data.resolution={resolution} is not divisible by {step} (SanaPipeline takes sizes divisible by 32; "
                f"VAE down-sampling {codec.downsample_factor} x patch {cfg.patch_size} = {factor}); use e.g. data.resolution={max(step, round(resolution / step) * step)}."
            )
        if image_channels != codec.image_channels:
            problems.append(f"data.channels={image_channels} does not match vae.in_channels={codec.image_channels}; model=latent_sana takes RGB images.")
        if problems:
            raise ConfigError(" ".join(problems))

    def lora_text_encoders(self, conditioner) -> tuple[torch.nn.Module, ...]:
        """Refused: ``SanaLoraLoaderMixin`` loads the transformer only, so a Gemma LoRA could not be exported."""
        raise ConfigError(
            "adapter.train_text_encoder=true: SanaPipeline's LoRA loader (SanaLoraLoaderMixin) loads the transformer only, so a "
            "LoRA on Gemma 2 could not be exported or loaded; set adapter.train_text_encoder=false (text_encoder.trainable=true "
            "fine-tunes Gemma 2 in full with adapter=none, exported in <run>/pipeline)."
        )

    def control_input(self, module, images: torch.Tensor) -> torch.Tensor:
        """The control image's DC-AE latents x ``scaling_factor`` (``SanaControlNetPipeline.__call__``)."""
        return control_latents(module, images)

    def forward(self, backbone, x_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states, encoder_attention_mask, **controls) -> torch.Tensor:
        """Latents ``[N, c, h, w]`` at timesteps ``t`` = sigma x 1000 -> velocity ``[N, c, h, w]``: the pipeline's
        call, ``timestep = t * timestep_scale``, the mask as the transformer's ``encoder_attention_mask``; a
        learned-sigma output (2c channels) keeps its first half, as the pipeline does."""
        out = backbone(
            x_t,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            timestep=t * backbone.config.timestep_scale,
            return_dict=False,
            **controls,
        )[0]
        if out.shape[1] == 2 * x_t.shape[1]:
            out = out.chunk(2, dim=1)[0]
        return out
