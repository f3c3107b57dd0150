"""Textual inversion (Gal et al. 2022) as an adapter (``adapter=textual_inversion``): learn the input
embedding of a new token in each text encoder the family's loader can carry it for, nothing else.

New placeholder tokens are added to each tokenizer, their rows of the encoder's token embedding are
initialised from an existing word, and only those rows train: backbone, VAE and the rest of the text
encoders stay frozen. As in diffusers' ``examples/textual_inversion``, every other row is restored after
each optimizer step (the gradients of the other rows are masked too, but AdamW's weight decay would move them). SD 1.x has one
encoder; SDXL two (diffusers' ``textual_inversion_sdxl.py`` learns both); SD3 two CLIPs and FLUX.1 one, plus
their T5 with ``adapter.t5=true`` (else T5 reads the placeholder as plain text, as the pipeline does once the
CLIP embeddings are loaded). The export is ``export/embeddings.py``.
"""

from __future__ import annotations

import torch

from diffusion_lab.utils.errors import ConfigError


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
            f"adapter.placeholder_token={placeholder!r} (or one of {tokens}) is already in the tokenizer's vocabulary: "
            f"textual inversion needs a new token. Pick a string the tokenizer does not know, e.g. '<{placeholder.strip('<>')}-ti>'."
        )
    init_ids = tokenizer.encode(initializer, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ConfigError(
            f"adapter.initializer_token={initializer!r} is {len(init_ids)} tokens for this tokenizer; it must be exactly one "
            f"(its embedding initialises the new token). Use a single-token word such as a word of the captions."
        )
    text_encoder.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(tokens)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = weight[init_ids[0]].clone()
    return ids


class TokenEmbedding(torch.nn.Module):
    """The placeholder rows of each text encoder's token embedding (a module for its buffers only: the
    weights stay the encoders'; the buffers move with the LightningModule, so restoring rows costs no copy).

    Args:
        placeholder_token: the new token (``"<thick>"``); the training captions must contain it.
        initializer_token: an existing one-token word whose embedding is the starting point.
        num_vectors: embedding vectors behind the placeholder (``<tok>``, ``<tok>_1``, ...).
        t5: also learn the token in a T5 encoder (SD3's ``text_encoder_3``, FLUX.1's ``text_encoder_2``); False:
            only the CLIP encoders learn it.
    """

    def __init__(self, placeholder_token: str, initializer_token: str, num_vectors: int = 1, t5: bool = False) -> None:
        super().__init__()
        if num_vectors < 1:
            raise ConfigError(f"adapter.num_vectors={num_vectors} must be >= 1.")
        self.placeholder_token, self.initializer_token, self.num_vectors, self.t5 = placeholder_token, initializer_token, num_vectors, t5
        self.names: list[str] = []
        self.encoders: list[torch.nn.Module] = []  # not children: they belong to the conditioner

    def attach(self, slots) -> None:
        """Add the tokens to each ``(component name, tokenizer, text encoder)`` and make only their rows trainable
        (a T5 encoder's only with ``t5``)."""
        for name, tokenizer, encoder in slots:
            if getattr(encoder.config, "model_type", None) == "t5" and not self.t5:
                if self.num_vectors > 1:
                    raise ConfigError(
                        f"adapter.num_vectors={self.num_vectors} with adapter.t5=false: the pipeline expands {self.placeholder_token} into its "
                        f"vectors only for the tokenizers that learned it, so the T5 encoder ({name}) would read another prompt than in "
                        f"training; set adapter.num_vectors=1 or adapter.t5=true."
                    )
                continue
            if encoder.dtype != torch.float32:
                raise ConfigError(f"text_encoder.dtype={encoder.dtype} but textual inversion trains its token embedding: use text_encoder.dtype=float32.")
            ids = add_placeholder_tokens(tokenizer, encoder, self.placeholder_token, self.initializer_token, self.num_vectors)
            weight = encoder.get_input_embeddings().weight
            weight.requires_grad_(True)
            frozen = torch.ones(len(weight), dtype=torch.bool)
            frozen[ids] = False
            k = len(self.names)
            self.register_buffer(f"ids_{k}", torch.tensor(ids), persistent=False)
            self.register_buffer(f"frozen_{k}", frozen, persistent=False)
            self.register_buffer(f"original_{k}", weight.detach().clone(), persistent=False)
            # only the placeholder rows get gradients: Adam's moments (and an EMA of the table, which a callback updates
            # before ``restore`` runs) never see the other caption tokens move
            weight.register_hook(lambda grad, k=k: grad * (~getattr(self, f"frozen_{k}")).to(grad)[:, None])
            self.names.append(name)
            self.encoders.append(encoder)

    def expand(self, captions: list[str]) -> list[str]:
        return [expand_placeholder(c, self.placeholder_token, self.num_vectors) for c in captions]

    @torch.no_grad()
    def restore(self) -> None:
        """Every row but the placeholders' back to the pretrained values (after each optimizer step)."""
        for k, encoder in enumerate(self.encoders):
            weight, frozen = encoder.get_input_embeddings().weight, getattr(self, f"frozen_{k}")
            weight[frozen] = getattr(self, f"original_{k}")[frozen].to(weight)

    def learned(self) -> dict[str, torch.Tensor]:
        """Component name -> the placeholder tokens' embeddings ``[num_vectors, D]`` (fp32, CPU)."""
        return {
            name: encoder.get_input_embeddings().weight[getattr(self, f"ids_{k}")].detach().float().cpu().clone()
            for k, (name, encoder) in enumerate(zip(self.names, self.encoders))
        }
