"""Text conditioning: tokenised captions -> text-encoder hidden states for cross-attention."""

from __future__ import annotations

from typing import Sequence

import torch

from diffusion_lab.components.pretrained import Dtype, torch_dtype


class TextConditioner(torch.nn.Module):
    """``CLIPTokenizer`` + ``CLIPTextModel`` (SD 1.x/2.x). Frozen by default: no grads and
    eval mode whatever Lightning does; ``trainable=True`` (``text_encoder.trainable=true``) trains
    it with the UNet. A LoRA added later makes just its LoRA weights trainable.

    Args:
        tokenizer: pads/truncates to ``tokenizer.model_max_length`` (77 for CLIP).
        text_encoder: its ``last_hidden_state`` ``[N, L, D]`` is the UNet's ``encoder_hidden_states``.
        dtype: dtype the frozen encoder is held in (trainable encoders stay float32).
    """

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, trainable: bool = False, dtype: Dtype = "float32") -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        if not trainable:
            self.text_encoder.requires_grad_(False).eval()
            if self.text_encoder.dtype != torch_dtype(dtype):
                self.text_encoder.to(torch_dtype(dtype))

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.text_encoder.parameters())

    def train(self, mode: bool = True) -> TextConditioner:
        return super().train(mode and not self.frozen)

    @property
    def hidden_size(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> ``input_ids`` ``[N, L]`` (padded to the tokenizer's max length, as SD does)."""
        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        return ids.to(self.text_encoder.device)

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> hidden states ``[N, L, D]`` (fp32)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.text_encoder(self.tokenize(captions))[0].float()
