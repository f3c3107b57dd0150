"""Z-Image (Tongyi-MAI 2025, arXiv 2511.22699): a single-stream DiT (``ZImageTransformer2DModel``: image
patches and caption features refined apart, then one sequence of joint blocks, 3-axis RoPE) trained by
flow matching on FLUX.1's 16-channel VAE latents, conditioned on a Qwen3 language model's penultimate
hidden states of the chat-formatted prompt. The export is a ``ZImagePipeline``.

What differs from the other families, each mirroring diffusers' ``ZImagePipeline``:

- text: ``_encode_prompt`` returns a LIST of per-prompt states of different lengths (the attention mask's
  tokens); ``ZImageTextConditioner`` pads them to a fixed ``max_sequence_length`` and returns the mask,
  so batches, cond/uncond halves and caches are plain tensors; ``forward`` trims them back.
- the backbone takes lists of per-image latents ``[C, 1, h, w]`` and caption features, a timestep that
  runs the other way (``(1000 - t) / 1000``: 0 is noise), and predicts minus the velocity.
- sampling: sigmas ``linspace(1, 1/N, N)`` with the resolution shift ``mu`` (used only by a scheduler with
  dynamic shifting: Z-Image's ships a static shift 3.0).
- guidance: the pipeline's ``guidance_scale`` s computes ``pos + s (pos - neg)``, the shared sampler's
  scale w computes ``neg + w (pos - neg)``: the same images for w = s + 1.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch

from diffusion_lab.components.pretrained import Dtype
from diffusion_lab.components.text import TextConditioner
from diffusion_lab.families.base import Family, control_latents, filter_set_timesteps, source
from diffusion_lab.utils.errors import ConfigError

PIPELINE = "ZImagePipeline"
TINY = "python -m diffusion_lab.tiny_sd outputs/tiny_z_image --kind z_image builds a tiny random one offline"


class ZImageTextConditioner(TextConditioner):
    """Qwen3 (``Qwen3Model``) + its tokenizer, exactly as ``ZImagePipeline._encode_prompt``: each caption
    wrapped in the tokenizer's chat template as one user turn (``add_generation_prompt``,
    ``enable_thinking=True``), padded/truncated to ``max_sequence_length``, encoded with its attention
    mask; the penultimate hidden states are the caption features.

    Args:
        tokenizer: a ``Qwen2Tokenizer`` with a chat template (``tokenizer/``).
        text_encoder: the ``Qwen3Model`` (``text_encoder/``).
        max_sequence_length: the fixed caption length (the pipeline call's ``max_sequence_length``, 512).
        trainable, dtype: as ``TextConditioner``.
    """

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, max_sequence_length: int = 512, trainable: bool = False, dtype: Dtype = "float32") -> None:
        super().__init__(tokenizer, text_encoder, trainable, dtype)
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError(
                f"the Z-Image tokenizer{source(text_encoder)} has no chat template: ZImagePipeline wraps each prompt in Qwen3's "
                f"chat template; load the tokenizer/ of a Z-Image folder (model.pretrained)."
            )
        self.max_sequence_length = max_sequence_length

    def chat(self, captions: Sequence[str]) -> list[str]:
        """The pipeline's prompt text: one user turn, generation prompt, thinking enabled."""
        return [
            self.tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True, enable_thinking=True)
            for c in captions
        ]

    def forward(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions -> ``encoder_hidden_states`` ``[N, L, D]`` (fp32, zeros past each caption) and
        ``encoder_attention_mask`` ``[N, L]`` (bool); ``L`` = ``max_sequence_length``."""
        inputs = self.tokenizer(self.chat(captions), padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt")
        device = self.text_encoder.device
        ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device).bool()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            states = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return {"encoder_hidden_states": states.float() * mask[..., None], "encoder_attention_mask": mask}


def captions_of(encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Padded states ``[N, L, D]`` + mask ``[N, L]`` -> the pipeline's list of ``[L_i, D]`` (``_encode_prompt``'s ``states[i][mask[i]]``)."""
    mask = encoder_attention_mask.bool()
    return [states[m] for states, m in zip(encoder_hidden_states, mask)]


class ZImage(Family):
    """``ZImagePipeline``: Qwen3 caption features, ``ZImageTransformer2DModel``, flow matching."""

    name = "latent_z_image"
    pipeline_class = PIPELINE
    controlnet_pipeline_class = "ZImageControlNetPipeline"
    text_keys = ("encoder_hidden_states", "encoder_attention_mask")
    refuses: ClassVar[dict[str, str]] = {
        "textual_inversion": "ZImagePipeline has no textual-inversion loader (it is not a TextualInversionLoaderMixin), so a learned token embedding could not be exported or loaded",
        "train_text_encoder": "ZImagePipeline's LoRA loader (ZImageLoraLoaderMixin) loads the transformer only, so a LoRA on Qwen3 could not be exported or "
        "loaded; set adapter.train_text_encoder=false (text_encoder.trainable=true with adapter=none fine-tunes Qwen3 in full, exported in <run>/pipeline).",
    }

    # ---- checks --------------------------------------------------------------------------------
    def check_parts(self, backbone, codec, conditioner, resolution: int, image_channels: int) -> None:
        """The transformer's ``in_channels`` == the VAE's latent channels, its ``cap_feat_dim`` == Qwen3's
        width, ``data.resolution`` divisible by VAE factor x patch 2, RGB images."""
        problems, cfg = [], backbone.config
        if type(backbone).__name__ != "ZImageTransformer2DModel":
            problems.append(f"backbone is a {type(backbone).__name__}{source(backbone)}; model=latent_z_image trains a ZImageTransformer2DModel (backbone=z_image_pretrained).")
        elif cfg.in_channels != codec.latent_channels:
            problems.append(f"backbone.in_channels={cfg.in_channels}{source(backbone)} does not match vae.latent_channels={codec.latent_channels}{source(codec.vae)}: use the VAE of the same model.pretrained.")
        width = int(conditioner.hidden_size)
        if type(backbone).__name__ == "ZImageTransformer2DModel" and cfg.cap_feat_dim != width:
            problems.append(f"backbone.cap_feat_dim={cfg.cap_feat_dim}{source(backbone)} does not match the text_encoder width {width}{source(conditioner.text_encoder)}: use the text encoder of the same model.pretrained.")
        factor = codec.downsample_factor * 2
        if resolution % factor:
            problems.append(f"data.resolution={resolution} is not divisible by {factor} = vae down-sampling {codec.downsample_factor} x patch size 2; use e.g. data.resolution={max(factor, round(resolution / factor) * factor)}.")
        if image_channels != codec.image_channels:
            problems.append(f"data.channels={image_channels} does not match vae.in_channels={codec.image_channels}; model=latent_z_image takes RGB images.")
        if problems:
            raise ConfigError(" ".join(problems))

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """``ZImagePipeline``'s guidance ``pos + s (pos - neg)`` (not ``neg + s (pos - neg)``): a sample grid's
        ``guidance_scale`` is the pipeline's."""
        return cond + scale * (cond - uncond)

    def lora_text_encoders(self, conditioner) -> tuple[torch.nn.Module, ...]:
        """Called when ``adapter.train_text_encoder=true``: a ConfigError (the export could not carry it)."""
        raise ConfigError(f"adapter.train_text_encoder=true with model={self.name}: {self.refuses['train_text_encoder']}")

    # ---- the backbone ----------------------------------------------------------------------------
    def control_input(self, module, images: torch.Tensor) -> torch.Tensor:
        """The control image's VAE latents (``ZImageControlNetPipeline.__call__``: the posterior mode, shifted
        and scaled); ``components/controlnet.py`` hands them to the ControlNet per image as ``[C, 1, h, w]``."""
        return control_latents(module, images)

    def forward(self, backbone, x_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor, **controls) -> torch.Tensor:
        """Latents ``[N, 16, h, w]`` at the process's timesteps ``t`` (sigma x 1000) -> velocity ``[N, 16, h, w]``
        (fp32), as ``ZImagePipeline.__call__``: per-image ``[C, 1, h, w]`` latents, each caption trimmed to its
        mask, timestep ``(1000 - t) / 1000``, output negated. ``controls``: a ControlNet's input (``Controlled``)."""
        dtype = x_t.dtype
        captions = [c.to(dtype) for c in captions_of(encoder_hidden_states, encoder_attention_mask)]
        out = backbone(list(x_t.unsqueeze(2).unbind(0)), (1000 - t) / 1000, captions, return_dict=False, **controls)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)

    # ---- sampling ----------------------------------------------------------------------------------
    def sampling_schedule(self, backbone, scheduler, shape: tuple[int, ...], num_inference_steps: int) -> dict | None:
        """``ZImagePipeline``: sigmas ``linspace(1, 1/N, N)`` and ``mu`` of the image's (h/2)(w/2) tokens."""
        from diffusers.pipelines.z_image import pipeline_z_image as z

        c = scheduler.config
        seq_len = (shape[-2] // 2) * (shape[-1] // 2)
        mu = z.calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        return filter_set_timesteps(scheduler, sigmas=z.get_default_z_image_sigmas(num_inference_steps), mu=mu)
