"""Building a ``LatentDiffusion`` from its parts: the checks that fail before training (one
paragraph naming the key and the fix), and the trained parts attached to the frozen ones in the
order the weights are drawn (adapters, textual-inversion rows, a ControlNet)."""

from __future__ import annotations

import torch

from diffusion_lab.components.adapters import add_lora, config_variant
from diffusion_lab.components.controlnet import ControlNetPart
from diffusion_lab.components.embeddings import TokenEmbedding
from diffusion_lab.components.pretrained import Dtype, torch_dtype
from diffusion_lab.components.quantization import check_quantized_training, is_quantized
from diffusion_lab.families.base import Family
from diffusion_lab.utils.errors import ConfigError, DataError


def check_parts(
    family: Family, process, sampler, backbone, codec, conditioner, resolution: int, image_channels: int, *, caption_dropout: float,
    prior_loss_weight: float, safety_checker: str | None, quantization: str, backbone_lora, text_lora, backbone_base_dtype: Dtype,
    export_fused: bool, group_offload: str | None,
) -> None:
    """ConfigError before any weight is touched: the family against the process, sampler, parts and settings."""
    family.check_process(process.kind)  # before the parts: a wrong process is the first thing to fix
    sampler.check(process.kind)
    family.check_parts(backbone, codec, conditioner, resolution, image_channels)
    if not 0.0 <= caption_dropout < 1.0:
        raise ConfigError(f"model.caption_dropout={caption_dropout} must be in [0, 1).")
    if prior_loss_weight < 0:
        raise ConfigError(f"model.prior_loss_weight={prior_loss_weight} must be >= 0.")
    if safety_checker and family.pipeline_class != "StableDiffusionPipeline":
        raise ConfigError(f"model.safety_checker: {family.pipeline_class} has no safety checker; leave it null for model={family.name}.")
    check_quantized_training(family.name, quantization, backbone, backbone_lora, export_fused)
    check_group_offload(group_offload)
    if text_lora is None and not conditioner.frozen and any(is_quantized(e) for e in conditioner.encoders):
        raise ConfigError(
            f"text_encoder.trainable=true with quantization={quantization}: the text encoders were quantized while loaded "
            f"(quantization.text_encoders=true) and cannot be fine-tuned in full. Set quantization.text_encoders=false, or "
            f"train a LoRA on them instead (adapter.train_text_encoder=true, text_encoder.trainable=false)."
        )
    variant = config_variant(backbone_lora or text_lora)
    if variant is not None and family.supports(variant):
        raise ConfigError(f"adapter={variant} cannot be used with model={family.name}: {family.supports(variant).rstrip('.')}.")
    if backbone_lora is None and backbone_base_dtype != "float32":
        raise ConfigError(
            f"adapter.base_dtype={backbone_base_dtype} holds the frozen backbone of an adapter in half precision, but "
            f"adapter=none trains the whole backbone, whose weights must stay float32; use trainer.precision=bf16-mixed instead."
        )


def attach_trained_parts(
    family: Family, backbone: torch.nn.Module, codec, conditioner, *, backbone_lora, text_lora, backbone_base_dtype: Dtype,
    text_embedding: TokenEmbedding | None, controlnet: ControlNetPart | None, gradient_checkpointing: bool,
) -> torch.nn.Module | None:
    """Add what trains to the parts, in this order (the order the new weights are drawn): the backbone's
    adapter (its frozen base cast to ``backbone_base_dtype``), the text encoders' adapters, a textual
    inversion's new rows, a ControlNet built from the backbone (returned; None without one)."""
    if backbone_lora is not None:
        add_lora(backbone if is_quantized(backbone) else backbone.to(torch_dtype(backbone_base_dtype)), backbone_lora)
    if text_lora is not None:
        for encoder in family.lora_text_encoders(conditioner):
            add_lora(encoder, text_lora)
    if gradient_checkpointing and not conditioner.frozen:
        for encoder in conditioner.encoders:
            encoder.gradient_checkpointing_enable()
    if text_embedding is not None:
        if family.supports("textual_inversion"):
            raise ConfigError(f"adapter=textual_inversion cannot be used with model={family.name}: {family.supports('textual_inversion').rstrip('.')}.")
        text_embedding.attach(zip(family.encoder_names, conditioner.tokenizers, conditioner.encoders))
        backbone.requires_grad_(False)
    if controlnet is None:
        return None
    check_controlnet(family, backbone_lora, text_lora, conditioner)
    net = controlnet.build(backbone=backbone, downsample_factor=codec.downsample_factor)
    backbone.requires_grad_(False)
    return net


def check_offload_frozen(offload_frozen: bool, conditioner) -> None:
    """``model.offload_frozen`` needs the text encoders frozen (checked once their adapters are attached)."""
    if offload_frozen and not conditioner.frozen:
        raise ConfigError(
            "model.offload_frozen=true keeps the frozen text encoders and VAE on the CPU, but the text encoder trains "
            "(text_encoder.trainable or adapter.train_text_encoder); set model.offload_frozen=false or freeze it."
        )


def check_placeholder_in_captions(dm, token: str) -> None:
    """DataError before training when no training caption among the first 64 has the placeholder."""
    ds = getattr(dm, "train_set", None)
    if ds is None:
        return
    captions = [ds[i].get("caption", "") for i in range(min(64, len(ds)))]
    if not any(token in c for c in captions):
        raise DataError(
            f"None of the first {len(captions)} training captions contains adapter.placeholder_token={token!r} "
            f"(e.g. {captions[0]!r}), so its embedding would never train. Put the token in the captions "
            f"(data=digits_concept: data.trigger={token!r}; a folder: its metadata captions)."
        )


def check_controlnet(family: Family, backbone_lora, text_lora, conditioner) -> None:
    """ConfigError before training: a family without a ControlNet, or an adapter / trained text encoder beside it."""
    reason = family.supports("controlnet")
    if reason:
        from diffusion_lab.families.matrix import families, support

        able = ", ".join(option for option, cls in families().items() if support(cls, "controlnet") is None)
        raise ConfigError(f"controlnet=from_backbone cannot be used with model={family.name}: {reason}. Use controlnet=none, or a family with one ({able}).")
    if backbone_lora is not None or text_lora is not None:
        raise ConfigError("controlnet=from_backbone trains only the ControlNet (backbone and text encoder stay frozen, as in diffusers' train_controlnet.py); use adapter=none.")
    if not conditioner.frozen:
        raise ConfigError("text_encoder.trainable=true: controlnet=from_backbone trains only the ControlNet, the text encoder stays frozen (as in diffusers' train_controlnet.py); set text_encoder.trainable=false.")


def check_group_offload(group_offload: str | None) -> None:
    """``model.group_offload`` is refused: diffusers' group offloading swaps each block's parameters
    between devices with forward hooks (``param.data = ...``), while a LoRA trains inside those
    blocks: the backward pass needs the frozen weights the hooks have already moved away, and the
    optimizer would hold parameters whose storage the hooks replace. diffusers supports it for
    inference only."""
    if group_offload is None:
        return
    raise ConfigError(
        f"model.group_offload={group_offload}: diffusers' group offloading moves the backbone's blocks off the device after "
        f"their forward pass, but training needs them again in backward and the LoRA's parameters live in the same blocks, so "
        f"it does not train (diffusers supports it for inference). Set model.group_offload=null; to save memory use "
        f"quantization=nf4|int8|float8, model.gradient_checkpointing=true and model.offload_frozen=true."
    )
