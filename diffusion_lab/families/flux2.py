"""FLUX.2 [klein] (Black Forest Labs 2026): rectified flow with an MMDiT (``Flux2Transformer2DModel``:
double- then single-stream blocks, RoPE over 4-axis (t, h, w, l) position ids, no guidance embedding)
on the 2x2-patchified, batch-norm-normalised latents of ``AutoencoderKLFlux2``, conditioned on three
stacked hidden layers of a Qwen3 language model. The export is a ``Flux2KleinPipeline``; it trains as
diffusers' ``examples/dreambooth/train_dreambooth_lora_flux2_klein.py`` does. ``Flux2Pipeline`` (FLUX.2
[dev], a Mistral text encoder, 32B) is not covered here.

What differs from FLUX.1, each mirroring ``Flux2KleinPipeline``:

- text (``Flux2TextConditioner``): ``_get_qwen3_prompt_embeds``: each caption as one user turn of the
  chat template (``enable_thinking=False``), ALWAYS padded to ``max_sequence_length`` (512) and encoded
  with its attention mask; hidden states of layers (9, 18, 27) stacked along the width ``[N, L, 3D]``.
  The transformer takes no text mask: the pipeline's own states are already fixed-length, so batches,
  cond/uncond halves and caches concatenate as they are.
- latents (``Flux2Codec``): the VAE's 32-channel posterior mode, 2x2-patchified to 128 channels and
  normalised by the VAE's batch-norm running statistics (``_encode_vae_image``); the module and the
  process see those ``[N, 128, H/16, W/16]`` latents, the pipeline's own noise shape.
- the backbone (``Flux2.forward``): one token per latent pixel (``_pack_latents``), ids from
  ``_prepare_latent_ids`` / ``_prepare_text_ids``, timestep sigma (= t / 1000), ``guidance=None``.
- sampling: sigmas ``linspace(1, 1/N, N)`` and ``mu = compute_empirical_mu(tokens, N)``: the shift
  depends on the step count too. klein *base* runs classifier-free guidance against "" (``guidance_scale``
  4, ``neg + s (pos - neg)``, the shared sampler's formula); the step-distilled klein runs none
  (``model.family.is_distilled=true``; exported as the pipeline's ``is_distilled``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from diffusion_lab.compat import diffusers as compat
from diffusion_lab.components.pretrained import Dtype
from diffusion_lab.components.text import TextConditioner
from diffusion_lab.components.vae import VAECodec
from diffusion_lab.families.base import Family, filter_set_timesteps, source
from diffusion_lab.utils.errors import ConfigError

PIPELINE = "Flux2KleinPipeline"
HUB = "black-forest-labs/FLUX.2-klein-base-4B"
TINY = "python -m diffusion_lab.tiny_sd outputs/tiny_flux2 --kind flux2 builds a tiny random one offline"


def _pipe():
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


class Flux2TextConditioner(TextConditioner):
    """Qwen3 (``Qwen3ForCausalLM``) + its ``Qwen2TokenizerFast``, exactly
    ``Flux2KleinPipeline._get_qwen3_prompt_embeds`` (which this calls).

    Args:
        tokenizer: a Qwen2 tokenizer with Qwen3's chat template (``tokenizer/``).
        text_encoder: the ``Qwen3ForCausalLM`` (``text_encoder/``).
        max_sequence_length: the fixed caption length (the pipeline call's ``max_sequence_length``, 512).
        out_layers: the hidden states stacked (the pipeline's ``text_encoder_out_layers``, (9, 18, 27)).
        trainable, dtype: as ``TextConditioner``.
    """

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, max_sequence_length: int = 512, out_layers: Sequence[int] = (9, 18, 27), trainable: bool = False, dtype: Dtype = "float32") -> None:
        super().__init__(tokenizer, text_encoder, trainable, dtype)
        self.max_sequence_length, self.out_layers = int(max_sequence_length), tuple(int(k) for k in out_layers)
        problems, layers = [], int(text_encoder.config.num_hidden_layers)
        if getattr(tokenizer, "chat_template", None) is None:
            problems.append(f"the tokenizer{source(text_encoder)} has no chat template: {PIPELINE} wraps each prompt in Qwen3's chat template; load the tokenizer/ of a FLUX.2 klein folder (model.pretrained).")
        if not all(0 <= k <= layers for k in self.out_layers):
            problems.append(f"text_encoder.out_layers={list(self.out_layers)} are not hidden states of a {layers}-layer text encoder{source(text_encoder)} (0 = embeddings .. {layers}); the pipeline stacks (9, 18, 27).")
        if problems:
            raise ConfigError(" ".join(problems))

    @property
    def hidden_size(self) -> int:
        """Width of ``encoder_hidden_states``: layers stacked x Qwen3's width (3 x 2560 = 7680 for klein 4B)."""
        return len(self.out_layers) * int(self.text_encoder.config.hidden_size)

    def forward(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions -> ``{"encoder_hidden_states": [N, max_sequence_length, hidden_size]}`` (fp32)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            states = compat.flux2_prompt_embeds(self.text_encoder, self.tokenizer, list(captions), self.max_sequence_length, self.out_layers)
        return {"encoder_hidden_states": states.float()}


class Flux2Codec(VAECodec):
    """``AutoencoderKLFlux2`` as the pipeline uses it: latents are the posterior's 2x2 patches
    (``_patchify_latents``) normalised by the VAE's batch-norm running statistics,
    ``(z - running_mean) / sqrt(running_var + batch_norm_eps)``; ``decode`` undoes both
    (``Flux2KleinPipeline.__call__``'s last lines). No scaling / shift factor.

    Args:
        vae, dtype: as ``VAECodec``.
        sample_posterior: False = the posterior mode, as diffusers' klein script and ``_encode_vae_image`` take.
    """

    scaling_factor, shift_factor = 1.0, 0.0

    def __init__(self, vae: torch.nn.Module, sample_posterior: bool = False, dtype: Dtype = "float32") -> None:
        super().__init__(vae, sample_posterior, dtype)

    @property
    def latent_channels(self) -> int:
        """Channels the transformer sees: 4 x the VAE's (2x2 patches): 128 for klein."""
        return 4 * int(self.vae.config.latent_channels)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent: the VAE's factor x 2 (patches): 16 for klein."""
        return 2 * super().downsample_factor

    def bn_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) ``[1, 4c, 1, 1]`` of the VAE's batch norm, on ``like``'s device and dtype."""
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def latents(self, moments: torch.Tensor, sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Posterior parameters ``[N, 2c, h, w]`` -> normalised patches ``[N, 4c, h/2, w/2]``."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dist = DiagonalGaussianDistribution(moments)
        z = compat.flux2_patchify_latents(dist.sample(generator) if sample else dist.mode())
        mean, std = self.bn_stats(z)
        return (z - mean) / std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised patches ``[N, 4c, h, w]`` -> images ``[N, 3, 2hf, 2wf]`` (fp32)."""
        mean, std = self.bn_stats(latents)
        z = compat.flux2_unpatchify_latents(latents * std + mean)
        return self.vae.decode(z.to(self.vae.device, self.vae.dtype)).sample.to(latents.device, torch.float32)


class Flux2(Family):
    """``Flux2KleinPipeline``: Qwen3 states, ``Flux2Transformer2DModel`` on normalised latent patches.

    Args:
        is_distilled: the step-distilled klein (no classifier-free guidance in previews and in the
            exported pipeline); False: klein *base*, the variant to fine-tune.
    """

    name = "latent_flux2"
    pipeline_class = PIPELINE
    text_keys = ("encoder_hidden_states",)
    refuses: ClassVar[dict[str, str]] = {
        "textual_inversion": f"{PIPELINE} has no textual-inversion loader (it is not a TextualInversionLoaderMixin) and Qwen3 has no token slot the export could carry.",
        "controlnet": "diffusers has no FLUX.2 ControlNet model or pipeline to export to.",
        "train_text_encoder": "Flux2LoraLoaderMixin loads LoRA weights into the transformer only (no text_encoder slot), so a text-encoder LoRA could not be exported; use adapter.train_text_encoder=false.",
    }

    def __init__(self, is_distilled: bool = False) -> None:
        self.is_distilled = bool(is_distilled)
        self.cfg = not self.is_distilled

    # ---- checks --------------------------------------------------------------------------------
    def check_parts(self, backbone, codec, conditioner, resolution: int, image_channels: int) -> None:
        """The transformer's ``in_channels`` == the codec's (4 x VAE) channels, its ``joint_attention_dim``
        == the stacked text width, ``data.resolution`` divisible by 2 x the VAE factor, RGB images."""
        problems, cfg = [], backbone.config
        if type(backbone).__name__ != "Flux2Transformer2DModel":
            problems.append(f"backbone is a {type(backbone).__name__}{source(backbone)}; model={self.name} trains a Flux2Transformer2DModel (backbone=flux2_pretrained).")
        else:
            if cfg.in_channels != codec.latent_channels:
                problems.append(
                    f"backbone.in_channels={cfg.in_channels}{source(backbone)} does not match {codec.latent_channels} = 2x2 patches x "
                    f"vae.latent_channels={codec.latent_channels // 4}{source(codec.vae)}: use the VAE of the same model.pretrained."
                )
            if cfg.joint_attention_dim != conditioner.hidden_size:
                problems.append(
                    f"backbone.joint_attention_dim={cfg.joint_attention_dim}{source(backbone)} does not match the text_encoder width "
                    f"{conditioner.hidden_size} = {len(conditioner.out_layers)} layers (text_encoder.out_layers) x {conditioner.text_encoder.config.hidden_size}"
                    f"{source(conditioner.text_encoder)}: use the text encoder of the same model.pretrained."
                )
        factor = codec.downsample_factor
        if resolution % factor:
            problems.append(f"data.resolution={resolution} is not divisible by {factor} = vae down-sampling {factor // 2} x 2x2 patches; use e.g. data.resolution={max(factor, round(resolution / factor) * factor)}.")
        if image_channels != codec.image_channels:
            problems.append(f"data.channels={image_channels} does not match vae.in_channels={codec.image_channels}; model={self.name} takes RGB images.")
        if problems:
            raise ConfigError(" ".join(problems))

    def lora_text_encoders(self, conditioner) -> tuple[torch.nn.Module, ...]:
        """Called when ``adapter.train_text_encoder=true``: a ConfigError (``Flux2LoraLoaderMixin`` has a
        transformer slot only, so the exported LoRA could not carry it)."""
        raise ConfigError(f"adapter.train_text_encoder=true with model={self.name}: {self.refuses['train_text_encoder']}")

    # ---- the backbone ----------------------------------------------------------------------------
    def forward(self, backbone, x_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, **extra) -> torch.Tensor:
        """Latents ``[N, C, h, w]`` at timesteps ``t`` = sigma x 1000 -> velocity ``[N, C, h, w]``, as
        ``Flux2KleinPipeline.__call__``: tokens ``[N, hw, C]`` (``_pack_latents``), 4-axis ids, timestep t / 1000.
        Unpacking is the transpose (``_unpack_latents_with_ids`` scatters the tokens of a full grid to the same places)."""
        n, c, h, w = x_t.shape
        states = encoder_hidden_states.to(x_t.dtype)
        out = backbone(
            hidden_states=compat.flux2_pack_latents(x_t),
            timestep=(t / 1000).to(x_t.dtype),
            guidance=None,
            encoder_hidden_states=states,
            txt_ids=compat.flux2_text_ids(states).to(x_t.device),
            img_ids=compat.flux2_latent_ids(x_t).to(x_t.device),
            return_dict=False,
            **extra,
        )[0]
        return out[:, : h * w].transpose(1, 2).reshape(n, c, h, w)

    def sampling_schedule(self, backbone, scheduler, shape, num_inference_steps):
        """``Flux2KleinPipeline``: sigmas ``linspace(1, 1/N, N)`` (none for a scheduler with flow sigmas) and
        ``mu = compute_empirical_mu(image tokens, N)``."""
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        n = num_inference_steps
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / n, n)
        mu = compute_empirical_mu(image_seq_len=shape[-2] * shape[-1], num_steps=n)
        return filter_set_timesteps(scheduler, sigmas=sigmas, mu=mu)

    # ---- export ----------------------------------------------------------------------------------
    def pipeline_parts(self, backbone, vae, scheduler, encoders, tokenizers) -> dict:
        return {**super().pipeline_parts(backbone, vae, scheduler, encoders, tokenizers), "is_distilled": self.is_distilled}

    def save_lora(self, out_dir: str, backbone: torch.nn.Module, encoders: dict[str, torch.nn.Module]) -> None:
        """``Flux2KleinPipeline.save_lora_weights`` of the transformer's peft state dict as it is, as diffusers'
        klein script saves it: ``Flux2LoraLoaderMixin`` reads peft keys (``lora_A`` / ``lora_B``) and does not map
        the old ``lora.down`` / ``lora.up`` names back, which ``convert_state_dict_to_diffusers`` gives
        ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0`` (their LoRA would be silently dropped on load)."""
        from peft.utils import get_peft_model_state_dict

        from diffusion_lab.components.adapters import lora_metadata

        _pipe().save_lora_weights(
            out_dir, transformer_lora_layers=get_peft_model_state_dict(backbone), transformer_lora_adapter_metadata=lora_metadata(backbone), safe_serialization=True
        )
