"""Text conditioning of the MMDiT families, exactly as their pipelines' ``encode_prompt`` computes it.

``SD3TextConditioner`` (Esser et al. 2024, sec. 5.2.1): CLIP ViT-L and OpenCLIP ViT-bigG (both with
projection) give penultimate hidden states, concatenated and zero-padded to T5's width, then T5-XXL's
states are appended along the sequence: ``[N, 77 + L, D_t5]``; the two projected pooled outputs,
concatenated, are the ``pooled_projections`` ``[N, 768 + 1280]``. T5 is optional (diffusers' SD3 docs,
"dropping the T5 text encoder"): without it the pipeline puts zeros ``[N, L, joint_attention_dim]``
in its place, and so does this conditioner.

``FluxTextConditioner`` (FLUX.1): CLIP ViT-L's pooled output ``[N, 768]`` is ``pooled_projections``,
T5-XXL's last hidden states ``[N, L, 4096]`` the ``encoder_hidden_states``.

``L`` is ``max_sequence_length`` (the pipeline call's argument: 256 for SD3, 512 for FLUX.1-dev by
default): sampling the export with a different one conditions on other padding than training did.
"""

from __future__ import annotations

from typing import Sequence

import torch

from diffusion_lab.components.pretrained import Dtype
from diffusion_lab.components.text import TextConditioner, _freeze, _tokenize


def t5_states(tokenizer, encoder: torch.nn.Module, captions: Sequence[str], max_sequence_length: int) -> torch.Tensor:
    """T5 last hidden states ``[N, max_sequence_length, d_model]`` of captions padded/truncated to
    ``max_sequence_length`` with ``</s>`` appended (``_get_t5_prompt_embeds``)."""
    ids = tokenizer(list(captions), padding="max_length", max_length=max_sequence_length, truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
    return encoder(ids.to(encoder.device))[0]


class SD3TextConditioner(TextConditioner):
    """SD3 / SD3.5's three text encoders.

    Args:
        tokenizer, text_encoder: CLIP ViT-L with projection (``tokenizer/``, ``text_encoder/``).
        tokenizer_2, text_encoder_2: OpenCLIP ViT-bigG with projection (``..._2/``).
        tokenizer_3, text_encoder_3: T5 (``..._3/``), or both None to train without it (zeros instead).
        max_sequence_length: T5 tokens (the pipeline's ``max_sequence_length``, 256 by default).
        joint_attention_dim: width of the zeros replacing T5; None = the transformer's
            ``joint_attention_dim``, set by the family (``families/sd3.py``).
        trainable, dtype: as ``TextConditioner``, for every encoder.
    """

    def __init__(
        self,
        tokenizer,
        text_encoder: torch.nn.Module,
        tokenizer_2,
        text_encoder_2: torch.nn.Module,
        tokenizer_3=None,
        text_encoder_3: torch.nn.Module | None = None,
        max_sequence_length: int = 256,
        joint_attention_dim: int | None = None,
        trainable: bool = False,
        dtype: Dtype = "float32",
    ) -> None:
        super().__init__(tokenizer, text_encoder, trainable, dtype)
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.tokenizer_3, self.text_encoder_3 = tokenizer_3, text_encoder_3
        if (tokenizer_3 is None) != (text_encoder_3 is None):
            from diffusion_lab.utils.errors import ConfigError

            raise ConfigError(
                "text_encoder.tokenizer_3 and text_encoder.text_encoder_3 must both be set (T5) or both be null (SD3 without T5: "
                "text_encoder=sd3_no_t5)."
            )
        self.max_sequence_length = max_sequence_length
        self.joint_attention_dim = joint_attention_dim
        if not trainable:
            for encoder in self.encoders[1:]:
                _freeze(encoder, dtype)

    @property
    def clip_encoders(self) -> tuple[torch.nn.Module, ...]:
        """The CLIP encoders: what ``adapter.train_text_encoder`` puts a LoRA on (SD3's LoRA loader has no T5 slot)."""
        return (self.text_encoder, self.text_encoder_2)

    @property
    def encoders(self) -> tuple[torch.nn.Module, ...]:
        return self.clip_encoders + ((self.text_encoder_3,) if self.text_encoder_3 is not None else ())

    @property
    def tokenizers(self) -> tuple:
        return (self.tokenizer, self.tokenizer_2, self.tokenizer_3)

    @property
    def hidden_size(self) -> int:
        """Width of ``encoder_hidden_states``: T5's ``d_model`` (the transformer's ``joint_attention_dim``)."""
        if self.text_encoder_3 is not None:
            return int(self.text_encoder_3.config.d_model)
        if self.joint_attention_dim is None:
            raise RuntimeError("SD3TextConditioner without T5 needs joint_attention_dim (set by the module from the transformer).")
        return int(self.joint_attention_dim)

    @property
    def pooled_size(self) -> int:
        """Width of ``pooled_projections``: both CLIP projections (768 + 1280 = 2048)."""
        return sum(int(e.config.projection_dim) for e in self.clip_encoders)

    def forward(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (``encoder_hidden_states`` ``[N, 77 + L, D]``, ``pooled_projections`` ``[N, P]``), fp32."""
        max_length = self.tokenizer.model_max_length  # the pipeline's tokenizer_max_length, for both CLIPs
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            clip_states, pooled = [], []
            for tokenizer, encoder in zip(self.tokenizers[:2], self.clip_encoders):
                ids = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
                out = encoder(ids.to(encoder.device), output_hidden_states=True)
                clip_states.append(out.hidden_states[-2].float())  # penultimate layer (clip_skip=None)
                pooled.append(out[0].float())  # text_embeds: the projected pooled output
            if self.text_encoder_3 is not None:
                t5 = t5_states(self.tokenizer_3, self.text_encoder_3, captions, self.max_sequence_length).float()
            else:
                t5 = torch.zeros(len(captions), self.max_sequence_length, self.hidden_size, device=pooled[0].device)
            clip = torch.cat(clip_states, dim=-1)
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # zeros up to T5's width
            return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


class FluxTextConditioner(TextConditioner):
    """FLUX.1's two text encoders.

    Args:
        tokenizer, text_encoder: CLIP ViT-L (``CLIPTextModel``): its pooled output.
        tokenizer_2, text_encoder_2: T5 (``T5EncoderModel``): its states.
        max_sequence_length: T5 tokens (the pipeline's ``max_sequence_length``: 512 by default, 256 for schnell).
        trainable, dtype: as ``TextConditioner``, for both encoders.
    """

    def __init__(
        self,
        tokenizer,
        text_encoder: torch.nn.Module,
        tokenizer_2,
        text_encoder_2: torch.nn.Module,
        max_sequence_length: int = 512,
        trainable: bool = False,
        dtype: Dtype = "float32",
    ) -> None:
        super().__init__(tokenizer, text_encoder, trainable, dtype)
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.max_sequence_length = max_sequence_length
        if not trainable:
            _freeze(self.text_encoder_2, dtype)

    @property
    def clip_encoders(self) -> tuple[torch.nn.Module, ...]:
        """The CLIP encoder: what ``adapter.train_text_encoder`` puts a LoRA on (Flux's LoRA loader has no T5 slot)."""
        return (self.text_encoder,)

    @property
    def encoders(self) -> tuple[torch.nn.Module, ...]:
        return (self.text_encoder, self.text_encoder_2)

    @property
    def tokenizers(self) -> tuple:
        return (self.tokenizer, self.tokenizer_2)

    @property
    def hidden_size(self) -> int:
        """Width of ``encoder_hidden_states``: T5's ``d_model`` (4096)."""
        return int(self.text_encoder_2.config.d_model)

    @property
    def pooled_size(self) -> int:
        """Width of ``pooled_projections``: CLIP's ``hidden_size`` (768; its pooler output, unprojected)."""
        return int(self.text_encoder.config.hidden_size)

    def forward(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (``encoder_hidden_states`` ``[N, L, D]``, ``pooled_projections`` ``[N, P]``), fp32."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            pooled = self.text_encoder(_tokenize(self.tokenizer, captions, self.text_encoder.device), output_hidden_states=False).pooler_output
            states = t5_states(self.tokenizer_2, self.text_encoder_2, captions, self.max_sequence_length)
            return states.float(), pooled.float()
