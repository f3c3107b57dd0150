"""LoRA and its variants through peft: add, export in diffusers and kohya layouts, fuse.

``variant``: ``lora`` (Hu et al. 2021), ``dora`` (weight-decomposed LoRA, Liu et al. 2024: a
learned magnitude per output row times the LoRA-updated direction), ``lokr`` (Kronecker-product
factors, LyCORIS) or ``loha`` (Hadamard product of two low-rank updates, Hyeon-Woo et al. 2022).

Only the LoRA weights train; the base model is frozen (and may be held in half precision: the
trainable LoRA weights are cast back to fp32 with diffusers' ``cast_training_params`` so fp16
loss scaling can unscale their gradients).
"""

from __future__ import annotations

import copy
from typing import Literal, Sequence

import torch
from diffusers import ModelMixin
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

# attention projections: diffusers' UNet names, and CLIP's
UNET_ATTENTION = ("to_k", "to_q", "to_v", "to_out.0")
CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
KOHYA_FILE = "lora_kohya.safetensors"  # not *pytorch_lora_weights*: load_lora_weights(dir) picks the diffusers file
Variant = Literal["lora", "dora", "lokr", "loha"]
VARIANTS: tuple[str, ...] = ("lora", "dora", "lokr", "loha")


def lora_config(
    rank: int = 4,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: Sequence[str] = UNET_ATTENTION,
    enabled: bool = True,
    init: str | bool = "gaussian",
    variant: Variant = "lora",
) -> PeftConfig | None:
    """The peft config of ``variant`` (``alpha`` defaults to ``rank``: scale alpha/rank = 1), or None
    when not ``enabled``. Every variant starts as the identity (its update is zero at step 0):
    LoRA/DoRA with ``init`` (B = 0), LoKr/LoHa with peft's default init (one factor zero).
    ``dropout`` is LoRA's input dropout, LoKr/LoHa's ``rank_dropout``."""
    if not enabled:
        return None
    alpha = alpha or rank
    if variant in ("lora", "dora"):
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=init, target_modules=list(target_modules), use_dora=variant == "dora")
    if variant == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=list(target_modules))
    if variant == "loha":
        return LoHaConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=list(target_modules))
    from diffusion_lab.utils.errors import ConfigError

    raise ConfigError(f"adapter.variant={variant!r} is not one of {', '.join(VARIANTS)} (adapter=lora|dora|lokr|loha sets it).")


def adapter_variant(model: torch.nn.Module) -> Variant | None:
    """Which variant ``model``'s adapter ``default`` is (None: no adapter)."""
    return config_variant(getattr(model, "peft_config", {}).get("default"))


def config_variant(config: PeftConfig | None) -> Variant | None:
    """Which variant a peft config builds (None: no config)."""
    if config is None:
        return None
    if isinstance(config, LoKrConfig):
        return "lokr"
    if isinstance(config, LoHaConfig):
        return "loha"
    return "dora" if getattr(config, "use_dora", False) else "lora"


def add_lora(model: torch.nn.Module, config: PeftConfig) -> torch.nn.Module:
    """Freeze ``model``, inject LoRA (or variant) layers as adapter ``default``, keep them fp32.

    diffusers models use their ``add_adapter``; for transformers models peft's
    ``inject_adapter_in_model`` is called directly and the config recorded where transformers'
    ``add_adapter`` would (that method demands a newer peft than diffusers does).
    """
    model.requires_grad_(False)
    if isinstance(model, ModelMixin):
        model.add_adapter(config)
    else:
        inject_adapter_in_model(config, model, adapter_name="default")
        model.peft_config = {"default": config}
    cast_training_params(model, dtype=torch.float32)
    return model


def has_lora(model: torch.nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``model`` in the diffusers layout that ``save_lora_weights`` writes."""
    peft = get_peft_model_state_dict(model)
    converted = convert_state_dict_to_diffusers(peft)
    # diffusers' UNet loader maps old-layout keys back only when the FIRST key is old-layout: a mix
    # (attention ``lora.down``, other layers such as proj_in ``lora_A``) silently loses layers on load,
    # so a mix is written in peft keys throughout, which every loader reads
    mixed = any(".lora_A." in k for k in converted) and any(".lora.down." in k for k in converted)
    return peft if mixed else converted


def lora_metadata(model: torch.nn.Module) -> dict:
    """The adapter config (rank, alpha, targets) stored in the safetensors header, so a loader
    gets alpha right when alpha != rank."""
    return model.peft_config["default"].to_dict()


def kohya_state_dict(parts: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """LoRA of ``{"unet": unet, "text_encoder": te}`` in the kohya/webui layout
    (``lora_unet_..._to_q.lora_down.weight`` + ``.alpha``) that A1111 and ComfyUI load.

    diffusers' ``convert_state_dict_to_kohya`` writes alpha = rank; the real ``lora_alpha`` is
    written instead so the kohya scale alpha/rank matches training.
    """
    peft_sd = {f"{name}.{k}": v for name, m in parts.items() for k, v in get_peft_model_state_dict(m).items()}
    kohya = convert_state_dict_to_kohya(peft_sd)
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1"}
    for name, m in parts.items():
        alpha = float(m.peft_config["default"].lora_alpha)
        for k in kohya:
            if k.endswith(".alpha") and k.startswith(prefixes[name]):
                kohya[k] = torch.tensor(alpha)
    return {k: v.detach().contiguous().cpu() for k, v in kohya.items()}


def fused_copy(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A ``dtype`` copy of ``model`` with its LoRA merged into the base weights and the LoRA
    layers removed: a plain model that ``save_pretrained`` writes in the base layout."""
    from diffusers.utils import recurse_remove_peft_layers

    fused = copy.deepcopy(model)
    if any(p.dtype != dtype for p in fused.parameters()):
        fused.to(dtype)
    for m in fused.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    fused = recurse_remove_peft_layers(fused)
    if hasattr(fused, "peft_config"):
        del fused.peft_config
    if hasattr(fused, "_hf_peft_config_loaded"):
        fused._hf_peft_config_loaded = False
    return fused
