"""diffusers internals, checked against 0.42.1: the pipelines' underscore static helpers that the
families call so that training sees exactly the tensors the exported pipeline builds, and the private
attributes of ``ModelMixin`` / configs. Each takes the helper's own arguments. When one breaks,
``tests/test_compat.py`` says which: read the pipeline's ``__call__`` in the new version for the
renamed helper (or copy its few lines here, citing it)."""

from __future__ import annotations

from typing import Sequence

import torch


def _flux():
    from diffusers import FluxPipeline

    return FluxPipeline


def _qwen():
    from diffusers import QwenImagePipeline

    return QwenImagePipeline


def _flux2():
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


# ---- FLUX.1 (FluxPipeline, 0.42.1) ----------------------------------------------------------------
def flux_pack_latents(latents: torch.Tensor, batch_size: int, channels: int, height: int, width: int) -> torch.Tensor:
    """``[N, c, h, w]`` -> ``[N, hw/4, 4c]``: ``FluxPipeline._pack_latents``."""
    return _flux()._pack_latents(latents, batch_size, channels, height, width)


def flux_unpack_latents(tokens: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """``[N, hw/4, 4c]`` -> ``[N, c, h, w]`` (``height`` / ``width`` in pixels of ``vae_scale_factor``):
    ``FluxPipeline._unpack_latents``."""
    return _flux()._unpack_latents(tokens, height, width, vae_scale_factor)


def flux_latent_image_ids(batch_size: int, height: int, width: int, device, dtype) -> torch.Tensor:
    """``[height * width, 3]`` position ids of the packed tokens: ``FluxPipeline._prepare_latent_image_ids``."""
    return _flux()._prepare_latent_image_ids(batch_size, height, width, device, dtype)


# ---- Qwen-Image (QwenImagePipeline, 0.42.1) --------------------------------------------------------
def qwen_pack_latents(latents: torch.Tensor, batch_size: int, channels: int, height: int, width: int) -> torch.Tensor:
    """``[N, c, 1, h, w]`` (or ``[N, c, h, w]``) -> ``[N, hw/4, 4c]``: ``QwenImagePipeline._pack_latents``."""
    return _qwen()._pack_latents(latents, batch_size, channels, height, width)


def qwen_unpack_latents(tokens: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """``[N, hw/4, 4c]`` -> ``[N, c, 1, h, w]``: ``QwenImagePipeline._unpack_latents``."""
    return _qwen()._unpack_latents(tokens, height, width, vae_scale_factor)


# ---- FLUX.2 klein (Flux2KleinPipeline, 0.42.1) -----------------------------------------------------
def flux2_prompt_embeds(text_encoder, tokenizer, prompts: list[str], max_sequence_length: int, hidden_states_layers: Sequence[int]) -> torch.Tensor:
    """Qwen3 hidden states ``hidden_states_layers`` stacked -> ``[N, L, layers x width]``:
    ``Flux2KleinPipeline._get_qwen3_prompt_embeds``."""
    return _flux2()._get_qwen3_prompt_embeds(text_encoder, tokenizer, prompts, max_sequence_length=max_sequence_length, hidden_states_layers=hidden_states_layers)


def flux2_patchify_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[N, c, h, w]`` -> 2x2 patches ``[N, 4c, h/2, w/2]``: ``Flux2KleinPipeline._patchify_latents``."""
    return _flux2()._patchify_latents(latents)


def flux2_unpatchify_latents(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of ``flux2_patchify_latents``: ``Flux2KleinPipeline._unpatchify_latents``."""
    return _flux2()._unpatchify_latents(latents)


def flux2_pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w]`` -> tokens ``[N, hw, C]``: ``Flux2KleinPipeline._pack_latents``."""
    return _flux2()._pack_latents(latents)


def flux2_text_ids(states: torch.Tensor) -> torch.Tensor:
    """4-axis position ids of the text tokens ``[N, L, D]``: ``Flux2KleinPipeline._prepare_text_ids``."""
    return _flux2()._prepare_text_ids(states)


def flux2_latent_ids(latents: torch.Tensor) -> torch.Tensor:
    """4-axis position ids of the image tokens of ``[N, C, h, w]``: ``Flux2KleinPipeline._prepare_latent_ids``."""
    return _flux2()._prepare_latent_ids(latents)


# ---- models and configs (ModelMixin / ConfigMixin, 0.42.1; transformers 5.x alike) -----------------
def supports_gradient_checkpointing(model: torch.nn.Module) -> bool:
    """Whether ``model.enable_gradient_checkpointing()`` does anything: diffusers' class attribute
    ``ModelMixin._supports_gradient_checkpointing`` (False for a module that is not a diffusers model)."""
    return bool(getattr(model, "_supports_gradient_checkpointing", False))


def declared_no_split_modules(module: torch.nn.Module) -> tuple[str, ...]:
    """Block class names ``module`` declares as units that must not be split (diffusers' and
    transformers' ``_no_split_modules``; empty when it declares none)."""
    return tuple(getattr(module, "_no_split_modules", None) or ())


def pretrained_name(config) -> str:
    """Where a model was loaded from (hub id or folder) as its config records it (``_name_or_path`` of a
    diffusers ``FrozenDict`` config or a transformers ``PretrainedConfig``; diffusers keeps the ``Path``
    it was given); "" when unknown."""
    return str(getattr(config, "_name_or_path", "") or "")


def forget_peft_config(model: torch.nn.Module) -> None:
    """After the LoRA layers were merged and removed, tell diffusers' ``PeftAdapterMixin`` that the model
    holds no adapter (its ``_hf_peft_config_loaded`` flag, 0.42.1), so the model saves and loads as a plain
    one. A model without the flag is left as it is."""
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False
