"""Qwen-Image (Qwen team 2025): rectified flow with a 60-block MMDiT (``QwenImageTransformer2DModel``: double-
stream blocks, 3-axis RoPE centred on the image, text after it) on 2x2-packed latents of a causal-3D video VAE
(``AutoencoderKLQwenImage``, 16 channels, 8x, per-channel mean / std). The text is the last hidden state of a
vision-language model (Qwen2.5-VL-7B) run on the caption inside a chat template whose system prefix is dropped,
with a mask over the caption's tokens. Sampling runs true classifier-free guidance against a negative prompt
with the guided prediction rescaled to the conditional one's norm, on a schedule shifted per image size.
Exports a ``QwenImagePipeline``; LoRA files through ``QwenImageLoraLoaderMixin`` (transformer only).

    QwenTextConditioner   QwenImagePipeline.encode_prompt / _get_qwen_prompt_embeds, padded to a fixed length
    QwenImageCodec        the pipeline's VAE calls: [N, C, H, W] images <-> normalised [N, c, h, w] latents
    QwenImage             the Family: packing, img_shapes, timestep scale, mu, export, checks
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from diffusion_lab.compat.diffusers import qwen_pack_latents, qwen_unpack_latents
from diffusion_lab.components.pretrained import Dtype
from diffusion_lab.components.text import TextConditioner
from diffusion_lab.components.vae import VAECodec
from diffusion_lab.families.base import Family, control_latents, filter_set_timesteps, source
from diffusion_lab.utils.errors import ConfigError

# QwenImagePipeline.__init__: prompt_template_encode, prompt_template_encode_start_idx, tokenizer_max_length
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the "
    "objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
DROP_IDX = 34
TOKENIZER_MAX_LENGTH = 1024
HUB_ID = "Qwen/Qwen-Image"


class QwenTextConditioner(TextConditioner):
    """Qwen2.5-VL's last hidden states of the caption, exactly ``QwenImagePipeline.encode_prompt``.

    The caption is put in ``PROMPT_TEMPLATE``, tokenized (padded to the longest, truncated at 1024 + 34), run
    through the whole VL model with the tokenizer's mask; each caption's valid states lose the template's first
    ``DROP_IDX`` (system prefix) tokens (``_get_qwen_prompt_embeds``) and are cut at ``max_sequence_length``
    (``encode_prompt``). Here they are then zero-padded to ``max_sequence_length`` with the mask 0 there, so
    batches, cond/uncond halves and cached states concatenate; the transformer drops masked keys, so the
    padding does not change its output (RoPE gives text positions by index: the first tokens keep theirs).

    Args:
        tokenizer, text_encoder: ``Qwen2Tokenizer`` and ``Qwen2_5_VLForConditionalGeneration`` (``tokenizer/``,
            ``text_encoder/``).
        max_sequence_length: text tokens after the prefix (the pipeline call's ``max_sequence_length``, 512 by default).
        trainable, dtype: as ``TextConditioner``.
    """

    template, drop_idx = PROMPT_TEMPLATE, DROP_IDX

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, max_sequence_length: int = 512, trainable: bool = False, dtype: Dtype = "float32") -> None:
        super().__init__(tokenizer, text_encoder, trainable, dtype)
        if not 0 < max_sequence_length <= TOKENIZER_MAX_LENGTH:
            raise ConfigError(f"text_encoder.max_sequence_length={max_sequence_length}: QwenImagePipeline takes 1..{TOKENIZER_MAX_LENGTH} text tokens.")
        self.max_sequence_length = max_sequence_length

    @property
    def hidden_size(self) -> int:
        """Width of ``encoder_hidden_states``: the language model's (3584 for Qwen2.5-VL-7B; ``joint_attention_dim``)."""
        config = self.text_encoder.config
        return int(getattr(config, "text_config", config).hidden_size)

    truncate = True  # encode_prompt cuts the states at max_sequence_length (QwenImageEditPipeline's does not)

    def inputs(self, captions: Sequence[str], images=None) -> dict[str, torch.Tensor]:
        """The text encoder's inputs: the templated captions, padded to the longest, truncated at 1024 + 34 tokens."""
        texts = [self.template.format(c) for c in captions]
        return dict(self.tokenizer(texts, max_length=TOKENIZER_MAX_LENGTH + self.drop_idx, padding=True, truncation=True, return_tensors="pt"))

    def encode(self, captions: Sequence[str], images=None) -> list[torch.Tensor]:
        """``_get_qwen_prompt_embeds`` up to its padding: each caption's valid last hidden states ``[L_i, D]``
        after the template prefix."""
        device = self.text_encoder.device
        inputs = {k: v.to(device) for k, v in self.inputs(captions, images).items() if k != "mm_token_type_ids"}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            states = self.text_encoder(**inputs, output_hidden_states=True).hidden_states[-1]
        return [s[m.bool()][self.drop_idx :] for s, m in zip(states, inputs["attention_mask"])]

    def forward(self, captions: Sequence[str], images=None) -> dict[str, torch.Tensor]:
        """Captions -> ``encoder_hidden_states`` ``[N, L, D]`` (fp32) and ``encoder_hidden_states_mask`` ``[N, L]``
        (1 on the caption's tokens, fp32), ``L = max_sequence_length``."""
        per_caption, L = self.encode(captions, images), self.max_sequence_length
        if not self.truncate and max(len(s) for s in per_caption) > L:
            raise ConfigError(
                f"text_encoder.max_sequence_length={L} is shorter than a caption's {max(len(s) for s in per_caption)} text + image "
                f"tokens, which the pipeline never truncates; raise it (at most {TOKENIZER_MAX_LENGTH})."
            )
        device = per_caption[0].device
        states = torch.zeros(len(per_caption), L, self.hidden_size, device=device)
        mask = torch.zeros(len(per_caption), L, device=device)
        for i, s in enumerate(per_caption):
            s = s[:L]
            states[i, : len(s)] = s.float()  # zeros after, as the pipeline pads to the batch's longest
            mask[i, : len(s)] = 1.0
        return {"encoder_hidden_states": states, "encoder_hidden_states_mask": mask}


class QwenImageCodec(VAECodec):
    """``AutoencoderKLQwenImage`` seen as an image VAE: images ``[N, C, H, W]`` are one-frame videos
    ``[N, C, 1, H, W]`` for it, and latents are normalised per channel,

        z = (E(x) - latents_mean) / latents_std        x = D(z * latents_std + latents_mean)

    with both vectors read from the VAE's config (``QwenImageEditPipeline._encode_vae_image`` and the decode
    at the end of ``QwenImagePipeline.__call__``). The module never sees the frame axis."""

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.vae.config
        shape = (1, int(c.z_dim), 1, 1)
        return torch.tensor(c.latents_mean).view(shape).to(like), torch.tensor(c.latents_std).view(shape).to(like)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.input_channels)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side: 2 per down-sampling stage (``QwenImagePipeline.vae_scale_factor``)."""
        return 2 ** len(self.vae.config.temperal_downsample)

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` in [-1, 1] -> posterior (mean, logvar) ``[N, 2c, h, w]`` (fp32)."""
        moments = self.vae.encode(images[:, :, None].to(self.vae.device, self.vae.dtype)).latent_dist.parameters
        return moments[:, :, 0].to(images.device, torch.float32).contiguous()

    def latents(self, moments: torch.Tensor, sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Posterior ``[N, 2c, h, w]`` -> normalised latents ``[N, c, h, w]`` (a sample, or the mode as the edit
        pipeline encodes its source image: ``sample_mode="argmax"``)."""
        dist = DiagonalGaussianDistribution(moments)
        z = dist.sample(generator) if sample else dist.mode()
        mean, std = self._stats(z)
        return (z - mean) / std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[N, c, h, w]`` -> images ``[N, C, h*f, w*f]`` in [-1, 1] (fp32), as the pipeline decodes."""
        z = latents.to(self.vae.device, self.vae.dtype)
        mean, std = self._stats(z)
        z = z / (1.0 / std) + mean  # the pipeline's arithmetic: latents / (1 / std) + mean
        return self.vae.decode(z[:, :, None]).sample[:, :, 0].to(latents.device, torch.float32)


def pack(x: torch.Tensor) -> torch.Tensor:
    """Latents ``[N, c, h, w]`` -> tokens ``[N, hw/4, 4c]`` (``QwenImagePipeline._pack_latents``)."""
    n, c, h, w = x.shape
    return qwen_pack_latents(x, n, c, h, w)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens ``[N, hw/4, 4c]`` -> latents ``[N, c, h, w]`` (``QwenImagePipeline._unpack_latents`` at factor 1,
    frame axis dropped)."""
    return qwen_unpack_latents(tokens, h, w, 1)[:, :, 0]


class QwenImage(Family):
    """``QwenImageTransformer2DModel`` on packed latents. The shared sampler and process see unpacked latents
    ``[N, c, h, w]``; ``forward`` packs them into tokens with the pipeline's ``img_shapes`` [(1, h/2, w/2)].
    Timesteps are sigma (the pipeline's ``t / 1000``)."""

    name = "latent_qwen_image"
    pipeline_class = "QwenImagePipeline"
    controlnet_pipeline_class = "QwenImageControlNetPipeline"
    text_keys = ("encoder_hidden_states", "encoder_hidden_states_mask")
    refuses: ClassVar[dict[str, str | None]] = {
        "textual_inversion": "QwenImagePipeline has no load_textual_inversion (no TextualInversionLoaderMixin), so learned token embeddings could not be exported or loaded.",
        "edit": "model=latent_qwen_image is text-to-image; edit pairs train model=latent_qwen_image_edit (QwenImageEditPipeline).",
    }

    def check_parts(self, backbone, codec, conditioner, resolution: int, image_channels: int) -> None:
        """in_channels = 4 x vae.z_dim (2x2 packing), out_channels = vae.z_dim, joint_attention_dim = the text
        encoder's width, data.resolution divisible by 2 x the VAE factor, RGB images."""
        cfg, problems = backbone.config, []
        z = codec.latent_channels
        for key, want in (("in_channels", 4 * z), ("out_channels", z)):
            if int(cfg[key]) != want:
                problems.append(f"backbone.{key}={cfg[key]}{source(backbone)} does not match {want} (vae z_dim={z}{source(codec.vae)}{', 2x2 packed' if key == 'in_channels' else ''}): use the VAE of the same model.pretrained.")
        if int(cfg.joint_attention_dim) != conditioner.hidden_size:
            problems.append(f"backbone.joint_attention_dim={cfg.joint_attention_dim}{source(backbone)} does not match the text encoder's width {conditioner.hidden_size}{source(conditioner.text_encoder)}: use the text encoder of the same model.pretrained.")
        factor = 2 * codec.downsample_factor
        if resolution % factor:
            problems.append(f"data.resolution={resolution} is not divisible by {factor} = vae down-sampling {codec.downsample_factor} x 2x2 latent packing; use e.g. data.resolution={max(factor, round(resolution / factor) * factor)}.")
        if image_channels != codec.image_channels:
            problems.append(f"data.channels={image_channels} does not match the VAE's input_channels={codec.image_channels}; model={self.name} takes RGB images.")
        if problems:
            raise ConfigError(" ".join(problems))

    def lora_text_encoders(self, conditioner) -> tuple[torch.nn.Module, ...]:
        """None: ``QwenImageLoraLoaderMixin`` saves and loads the transformer's LoRA only."""
        raise ConfigError(
            f"adapter.train_text_encoder=true: {self.pipeline_class}'s LoRA loader (QwenImageLoraLoaderMixin) has no text encoder "
            f"slot, so a LoRA on Qwen2.5-VL could not be exported; set adapter.train_text_encoder=false (or text_encoder.trainable=true "
            f"to fine-tune it in full)."
        )

    def img_shapes(self, n: int, h: int, w: int) -> list:
        """The transformer's RoPE layout per example: one frame of (h/2) x (w/2) tokens (``__call__``'s img_shapes)."""
        return [[(1, h // 2, w // 2)]] * n

    def forward(self, backbone, x_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states, encoder_hidden_states_mask=None, **controls) -> torch.Tensor:
        """``[N, c, h, w]`` at timesteps ``t`` = sigma x 1000 -> velocity ``[N, c, h, w]``."""
        n, _, h, w = x_t.shape
        out = backbone(
            hidden_states=pack(x_t),
            timestep=(t / 1000).to(x_t.dtype),
            encoder_hidden_states=encoder_hidden_states,
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            img_shapes=self.img_shapes(n, h, w),
            **controls,
        ).sample
        return unpack(out[:, : (h // 2) * (w // 2)], h, w)

    def control_input(self, module, images: torch.Tensor) -> torch.Tensor:
        """The control image's normalised VAE latents packed into tokens ``[N, hw/4, 4c]``
        (``QwenImageControlNetPipeline.__call__``, which samples the posterior: here its mean). That pipeline's
        true CFG reuses the positive prompt's ControlNet residuals for the negative pass; previews run the
        ControlNet on each half (the same images without guidance, ``true_cfg_scale=1``)."""
        return pack(control_latents(module, images))

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """``__call__``'s true CFG: ``uncond + s (cond - uncond)`` rescaled, per packed token, to the norm of the
        conditional prediction (over its 4c channels). On ``[N, c, h, w]`` predictions."""
        h, w = cond.shape[-2:]
        c, u = pack(cond), pack(uncond)
        comb = u + scale * (c - u)
        return unpack(comb * (torch.norm(c, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True)), h, w)

    def image_seq_len(self, shape: tuple[int, ...]) -> int:
        return (shape[-2] // 2) * (shape[-1] // 2)

    def sampling_schedule(self, backbone, scheduler, shape, num_inference_steps):
        """``QwenImagePipeline.__call__``: sigmas ``linspace(1, 1/N, N)`` and the shift ``mu`` of the token count
        (its ``calculate_shift`` with the scheduler's base/max sequence lengths and shifts)."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        c = scheduler.config
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift(self.image_seq_len(shape), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        return filter_set_timesteps(scheduler, sigmas=sigmas, mu=mu)

