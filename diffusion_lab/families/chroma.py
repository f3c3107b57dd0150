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
