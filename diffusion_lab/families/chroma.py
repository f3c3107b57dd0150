"""Chroma (lodestones/Chroma1-HD): FLUX.1-schnell's layout, T5 only, real classifier-free guidance.

``ChromaTransformer2DModel`` is FLUX.1's MMDiT with the per-block modulation produced by one small MLP
(the "approximator") from the timestep alone: no CLIP pooled projection, no embedded guidance. The text is
T5's states with an attention mask that keeps the caption's tokens and ONE padding token
(``ChromaPipeline._get_t5_prompt_embeds``); sampling runs true classifier-free guidance against a negative
prompt ("" by default). Latents are packed into 2x2 tokens with RoPE ids exactly as FLUX.1's
(``families/flux.py``), and the pipeline shifts the schedule per image size as FLUX.1-dev does.

Mask note: ``ChromaPipeline`` hands the transformer the mask in the states' float dtype, which
``scaled_dot_product_attention`` reads as an additive bias (+1 on kept tokens, 0 on padding), not as a
keep/drop mask (diffusers issues #12116 and #13619). The family passes it exactly as the pipeline does, so
training, previews and the exported pipeline condition alike.
"""

from __future__ import annotations

from typing import Sequence

import torch

from diffusion_lab.components.pretrained import Dtype
from diffusion_lab.components.text import TextConditioner
from diffusion_lab.families.flux import Flux, image_ids, pack, unpack


class ChromaTextConditioner(TextConditioner):
    """T5 states and Chroma's text mask, exactly ``ChromaPipeline.encode_prompt``.

    Args:
        tokenizer, text_encoder: ``T5TokenizerFast`` and ``T5EncoderModel`` (``tokenizer/``, ``text_encoder/``).
        max_sequence_length: T5 tokens, the pipeline's ``max_sequence_length`` (512 by default): every caption
            is padded to it, so batches, cond/uncond halves and cached states concatenate.
        trainable, dtype: as ``TextConditioner``.
    """

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, max_sequence_length: int = 512, trainable: bool = False, dtype: Dtype = "float32") -> None:
        super().__init__(tokenizer, text_encoder, trainable, dtype)
        self.max_sequence_length = max_sequence_length

    @property
    def hidden_size(self) -> int:
        """Width of ``encoder_hidden_states``: T5's ``d_model`` (4096; the transformer's ``joint_attention_dim``)."""
        return int(self.text_encoder.config.d_model)

    def forward(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions -> ``encoder_hidden_states`` ``[N, L, D]`` (T5 run with the tokenizer's mask) and
        ``attention_mask`` ``[N, L]``: 1 on the caption's tokens (``</s>`` included) and the first padding
        token, 0 after (``_get_t5_prompt_embeds``), both fp32; ``L = max_sequence_length``."""
        tokens = self.tokenizer(list(captions), padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt")
        device = self.text_encoder.device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            states = self.text_encoder(ids, output_hidden_states=False, attention_mask=mask)[0]
        keep = torch.arange(mask.shape[1], device=device)[None, :] <= mask.sum(dim=1, keepdim=True)  # + one padding token
        return {"encoder_hidden_states": states.float(), "attention_mask": keep.float()}


class Chroma(Flux):
    """``ChromaTransformer2DModel`` on FLUX.1's packed latents, conditioned on T5 states + Chroma's text mask,
    sampled with true classifier-free guidance (negative prompt "", ``ChromaPipeline``'s default). Exports a
    ``ChromaPipeline``; the schedule (sigmas ``linspace(1, 1/N, N)`` and the resolution shift ``mu``) is FLUX.1's.
    """

    name = "latent_chroma"
    pipeline_class = "ChromaPipeline"
    controlnet_pipeline_class = None  # diffusers has no Chroma ControlNet
    encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    text_keys = ("encoder_hidden_states", "attention_mask")
    cfg = True  # ChromaPipeline runs real CFG (guidance_scale 5.0 by default) against the negative prompt
    refuses = {
        "textual_inversion": "ChromaPipeline's text encoder is T5 (a SentencePiece vocabulary): the textual-inversion "
        "part learns CLIP token embeddings.",
        "train_text_encoder": "the text encoder is T5, and adapter.text_encoder's LoRA targets CLIP's attention "
        "(q_proj/k_proj/v_proj/out_proj; T5 names them q/k/v/o); train the transformer's LoRA only, or fine-tune T5 in "
        "full with text_encoder.trainable=true.",
    }

    def __init__(self) -> None:  # no embedded guidance: nothing to configure
        super().__init__()

    def check_parts(self, backbone, codec, conditioner, resolution: int, image_channels: int) -> None:
        """FLUX.1's checks (channels, T5 width, resolution), with no pooled projection on either side."""
        from types import SimpleNamespace

        from diffusers.configuration_utils import FrozenDict

        from diffusion_lab.components.mmdit import check_transformer_parts

        config = FrozenDict({**backbone.config, "pooled_projection_dim": None})
        text = SimpleNamespace(hidden_size=conditioner.hidden_size, pooled_size=None)
        check_transformer_parts(self.name, SimpleNamespace(config=config), codec, text, resolution, image_channels, self.packing)

    def lora_text_encoders(self, conditioner) -> tuple[torch.nn.Module, ...]:
        """Called when ``adapter.train_text_encoder=true``: a ConfigError (see ``refuses``)."""
        from diffusion_lab.utils.errors import ConfigError

        raise ConfigError(f"adapter.train_text_encoder=true with model={self.name}: {self.refuses['train_text_encoder']}")

    def text_states(self, conditioner, captions: list[str]) -> dict[str, torch.Tensor]:
        return conditioner(captions)

    def conditioning(self, module, batch: dict | None, n: int, sampling: bool) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, backbone, x_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states, attention_mask=None, **controls) -> torch.Tensor:
        """``[N, c, h, w]`` at timesteps ``t`` = sigma x 1000 -> velocity ``[N, c, h, w]``: the transformer
        call of ``ChromaPipeline.__call__``, its text mask extended by ones over the image tokens
        (``_prepare_attention_mask``) in the latents' float dtype, as the pipeline passes it."""
        h, w = x_t.shape[-2:]
        tokens = pack(x_t)
        if attention_mask is not None:
            image = torch.ones(tokens.shape[0], tokens.shape[1], device=x_t.device, dtype=x_t.dtype)
            attention_mask = torch.cat([attention_mask.to(x_t.dtype), image], dim=1)
        out = backbone(
            hidden_states=tokens,
            timestep=(t / 1000).to(x_t.dtype),
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=torch.zeros(encoder_hidden_states.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
            img_ids=image_ids(h, w, x_t.device, x_t.dtype),
            attention_mask=attention_mask,
            **controls,
        ).sample
        return unpack(out, h, w)
