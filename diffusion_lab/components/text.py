"""Text conditioning: tokenised captions -> text-encoder hidden states for cross-attention.

``TextConditioner``: one CLIP encoder (SD 1.x/2.x). ``DualTextConditioner``: SDXL's two encoders
(hidden states for cross-attention plus a pooled embedding for the UNet's added conditioning)."""

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
            _freeze(self.text_encoder, dtype)

    @property
    def encoders(self) -> tuple[torch.nn.Module, ...]:
        """Every text encoder (LoRA and gradient checkpointing apply to each)."""
        return (self.text_encoder,)

    @property
    def tokenizers(self) -> tuple:
        """The tokenizer of each encoder, in the same order."""
        return (self.tokenizer,)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for encoder in self.encoders for p in encoder.parameters())

    def train(self, mode: bool = True) -> TextConditioner:
        return super().train(mode and not self.frozen)

    @property
    def hidden_size(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> ``input_ids`` ``[N, L]`` (padded to the tokenizer's max length, as SD does)."""
        return _tokenize(self.tokenizer, captions, self.text_encoder.device)

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> hidden states ``[N, L, D]`` (fp32)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.text_encoder(self.tokenize(captions))[0].float()


class DualTextConditioner(TextConditioner):
    """SDXL's two text encoders, exactly as ``StableDiffusionXLPipeline.encode_prompt`` uses them:
    CLIP ViT-L (``CLIPTextModel``) and OpenCLIP ViT-bigG (``CLIPTextModelWithProjection``), each with
    its own tokenizer; the penultimate hidden states of both are concatenated for cross-attention
    and the projected pooled output of the second is the UNet's ``text_embeds`` (Podell et al. 2023).

    Args:
        tokenizer, text_encoder: the first encoder (``tokenizer/``, ``text_encoder/``).
        tokenizer_2, text_encoder_2: the second (``tokenizer_2/``, ``text_encoder_2/``).
        trainable, dtype: as ``TextConditioner``, for both encoders.
    """

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, tokenizer_2, text_encoder_2: torch.nn.Module, trainable: bool = False, dtype: Dtype = "float32") -> None:
        super().__init__(tokenizer, text_encoder, trainable, dtype)
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2
        if not trainable:
            _freeze(self.text_encoder_2, dtype)

    @property
    def encoders(self) -> tuple[torch.nn.Module, ...]:
        return (self.text_encoder, self.text_encoder_2)

    @property
    def tokenizers(self) -> tuple:
        return (self.tokenizer, self.tokenizer_2)

    @property
    def hidden_size(self) -> int:
        """Width of the concatenated states: the UNet's ``cross_attention_dim`` (768 + 1280 = 2048)."""
        return sum(int(encoder.config.hidden_size) for encoder in self.encoders)

    @property
    def pooled_size(self) -> int:
        """Width of ``text_embeds``: the second encoder's ``projection_dim`` (1280)."""
        return int(self.text_encoder_2.config.projection_dim)

    def forward(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (hidden states ``[N, L, D1 + D2]``, pooled ``[N, P]``), fp32."""
        states = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                out = encoder(_tokenize(tokenizer, captions, encoder.device), output_hidden_states=True)
                states.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
            return torch.cat(states, dim=-1).float(), out.text_embeds.float()


def _freeze(encoder: torch.nn.Module, dtype: Dtype) -> None:
    """No grads, eval mode, held in ``dtype`` (a quantized encoder was loaded in it: quantization.transformers)."""
    from diffusion_lab.components.quantization import is_quantized

    encoder.requires_grad_(False).eval()
    if not is_quantized(encoder) and encoder.dtype != torch_dtype(dtype):
        encoder.to(torch_dtype(dtype))


def _tokenize(tokenizer, captions: Sequence[str], device: torch.device) -> torch.Tensor:
    """Captions -> ``input_ids`` ``[N, tokenizer.model_max_length]`` on ``device`` (truncated, padded)."""
    ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return ids.to(device)
