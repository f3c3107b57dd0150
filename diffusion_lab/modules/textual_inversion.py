"""Textual inversion (Gal et al. 2022): learn the input embedding of a new token, nothing else.

    python -m diffusion_lab.train experiment=textual_inversion_tiny

New placeholder tokens are added to the tokenizer, their rows of the text encoder's token
embedding are initialised from an existing word, and only those rows train: UNet, VAE and the rest
of the text encoder stay frozen. As in diffusers' ``examples/textual_inversion``, every other row is
restored after each optimizer step (masking gradients alone would let AdamW's weight decay move
them). The export (``export/embeddings.py``) is ``<run dir>/textual_inversion/``:
``learned_embeds.safetensors`` for ``pipe.load_textual_inversion(dir)`` and the A1111 / ComfyUI
embedding files.
"""

from __future__ import annotations

import torch

from diffusion_lab.modules.latent import LatentDiffusion
from diffusion_lab.utils.errors import ConfigError, DataError


def placeholder_tokens(placeholder: str, num_vectors: int = 1) -> list[str]:
    """``["<tok>", "<tok>_1", ...]``: diffusers' names for a multi-vector embedding (its
    ``load_textual_inversion`` re-creates them and its pipelines expand ``<tok>`` in prompts)."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def expand_placeholder(caption: str, placeholder: str, num_vectors: int) -> str:
    """``"a <tok> dog"`` -> ``"a <tok> <tok>_1 dog"``: what the pipelines feed the tokenizer."""
    return caption.replace(placeholder, " ".join(placeholder_tokens(placeholder, num_vectors))) if num_vectors > 1 else caption


def add_placeholder_tokens(tokenizer, text_encoder: torch.nn.Module, placeholder: str, initializer: str, num_vectors: int = 1) -> list[int]:
    """Add the placeholder tokens to ``tokenizer``, grow ``text_encoder``'s token embedding and set
    their rows to the embedding of ``initializer`` (one existing token). Returns their ids."""
    tokens = placeholder_tokens(placeholder, num_vectors)
    if tokenizer.add_tokens(tokens) != len(tokens):
        raise ConfigError(
            f"model.placeholder_token={placeholder!r} (or one of {tokens}) is already in the tokenizer's vocabulary: "
            f"textual inversion needs a new token. Pick a string the tokenizer does not know, e.g. '<{placeholder.strip('<>')}-ti>'."
        )
    init_ids = tokenizer.encode(initializer, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ConfigError(
            f"model.initializer_token={initializer!r} is {len(init_ids)} tokens for this tokenizer; it must be exactly one "
            f"(its embedding initialises the new token). Use a single-token word such as a word of the captions."
        )
    text_encoder.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(tokens)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = weight[init_ids[0]].clone()
    return ids


class TextualInversion(LatentDiffusion):
    """``LatentDiffusion`` whose only trainable weights are the placeholder tokens' embedding rows.

    Args:
        placeholder_token: the new token (``"<thick>"``); the training captions must contain it.
        initializer_token: an existing one-token word whose embedding is the starting point.
        num_vectors: embedding vectors behind the placeholder (``<tok>``, ``<tok>_1``, ...).
        **kwargs: ``LatentDiffusion``'s (no adapter: ``adapter=none``; an SD 1.x/2.x text encoder).
    """

    def __init__(self, placeholder_token: str, initializer_token: str, num_vectors: int = 1, **kwargs) -> None:
        if kwargs.get("backbone_lora") is not None or kwargs.get("text_lora") is not None:
            raise ConfigError("Textual inversion trains token embeddings only; use adapter=none (the UNet stays frozen).")
        if num_vectors < 1:
            raise ConfigError(f"model.num_vectors={num_vectors} must be >= 1.")
        conditioner, family = kwargs["conditioner"], kwargs["family"]
        if family.supports("textual_inversion"):
            raise ConfigError(f"textual inversion (model._target_=diffusion_lab.modules.TextualInversion) cannot be used with model={family.name}: {family.supports('textual_inversion')}.")
        encoder = conditioner.text_encoder
        if encoder.dtype != torch.float32:
            raise ConfigError(f"text_encoder.dtype={encoder.dtype} but textual inversion trains its token embedding: use text_encoder.dtype=float32.")
        ids = add_placeholder_tokens(conditioner.tokenizer, encoder, placeholder_token, initializer_token, num_vectors)
        super().__init__(**kwargs)
        self.base_backbone.requires_grad_(False)
        weight = encoder.get_input_embeddings().weight
        weight.requires_grad_(True)
        frozen = torch.ones(len(weight), dtype=torch.bool)
        frozen[ids] = False
        self.register_buffer("placeholder_ids", torch.tensor(ids), persistent=False)
        self.register_buffer("frozen_rows", frozen, persistent=False)
        self.register_buffer("original_embeddings", weight.detach().clone(), persistent=False)
        self.train()  # the text encoder now trains (its embedding): train mode, as LatentDiffusion sets it

    @property
    def token_embedding(self) -> torch.nn.Parameter:
        """The text encoder's token embedding ``[vocab, D]`` (only the placeholder rows change)."""
        return self.conditioner.text_encoder.get_input_embeddings().weight

    def learned_embeddings(self) -> torch.Tensor:
        """The placeholder tokens' embeddings ``[num_vectors, D]`` (fp32, CPU)."""
        return self.token_embedding[self.placeholder_ids].detach().float().cpu().clone()

    def text_states(self, captions: list[str]) -> dict[str, torch.Tensor]:
        p = self.hparams
        return super().text_states([expand_placeholder(c, p.placeholder_token, p.num_vectors) for c in captions])

    def on_fit_start(self) -> None:
        """DataError before training when no training caption among the first 64 has the placeholder."""
        dm = getattr(self.trainer, "datamodule", None)
        ds = getattr(dm, "train_set", None)
        if ds is None:
            return
        token = self.hparams.placeholder_token
        captions = [ds[i].get("caption", "") for i in range(min(64, len(ds)))]
        if not any(token in c for c in captions):
            raise DataError(
                f"None of the first {len(captions)} training captions contains model.placeholder_token={token!r} "
                f"(e.g. {captions[0]!r}), so its embedding would never train. Put the token in the captions "
                f"(data=digits_concept: data.trigger={token!r}; a folder: its metadata captions)."
            )

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        with torch.no_grad():  # every row but the placeholders' back to the pretrained values
            weight = self.token_embedding
            weight[self.frozen_rows] = self.original_embeddings[self.frozen_rows].to(weight)
