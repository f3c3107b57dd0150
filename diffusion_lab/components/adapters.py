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

from diffusion_lab.compat.diffusers import forget_peft_config

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
    forget_peft_config(fused)
    return fused


INIT_ADAPTER = "init_from"  # the scratch adapter a LoRA file is read into before its weights move to "default"


def init_lora_from(path: str, pipe, parts: dict[str, torch.nn.Module]) -> int:
    """Start the LoRA (adapter ``default``) of ``parts`` (a pipeline's component name -> model) from the LoRA
    file ``path`` (``adapter.init_from``), in any layout ``pipe.load_lora_weights`` reads (diffusers, kohya /
    A1111). The file is read into a scratch adapter by the pipeline's own loader, each layer's ``B A`` update
    moved into ``default`` (``B`` rescaled by the file's alpha / r over the run's), the scratch adapter deleted.
    Returns the number of layers set. ConfigError naming the file: not a file / not a LoRA this pipeline
    reads / no layer of this backbone (another family or base), a layer the run does not target, another rank."""
    from peft.tuners.lora import LoraLayer

    where = f"adapter.init_from={path}"
    _load_scratch_adapter(path, pipe, where)
    moved, bad_rank, untargeted = 0, [], []
    with torch.no_grad():
        for part, model in parts.items():
            for name, m in model.named_modules():
                if not isinstance(m, LoraLayer) or INIT_ADAPTER not in m.lora_A:
                    continue
                if "default" not in m.lora_A:
                    untargeted.append(f"{part}.{name}")
                    continue
                ranks = _move_scratch_layer(m, where)
                if ranks is not None:
                    bad_rank.append((f"{part}.{name}", *ranks))
                else:
                    moved += 1
            _delete_adapter(model, INIT_ADAPTER)
    _check_moved(where, moved, bad_rank, untargeted)
    return moved


def _load_scratch_adapter(path: str, pipe, where: str) -> None:
    """The LoRA file ``path`` loaded by ``pipe``'s own loader as adapter ``INIT_ADAPTER``; ConfigError naming it otherwise."""
    from pathlib import Path

    from diffusion_lab.utils.errors import ConfigError

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{where}: no such file; pass a LoRA .safetensors file (diffusers' pytorch_lora_weights.safetensors or a kohya / A1111 file).")
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=INIT_ADAPTER)
    except Exception as e:  # diffusers raises ValueError / KeyError / RuntimeError (size mismatch) here
        first = " ".join(str(e).strip().splitlines()[:2])[:400] or type(e).__name__
        raise ConfigError(
            f"{where} is not a LoRA {type(pipe).__name__} can load onto this model ({first}). Pass a LoRA trained on the "
            f"same family and base (model.pretrained), as diffusers' pytorch_lora_weights.safetensors or a kohya / A1111 file."
        ) from e


def _move_scratch_layer(m, where: str) -> tuple[int, int] | None:
    """Copy one LoRA layer's scratch adapter into ``default`` (``B`` rescaled to the run's alpha / r; DoRA: the
    magnitudes too). Returns (the file's rank, the run's) when they differ, copying nothing."""
    from diffusion_lab.utils.errors import ConfigError

    a, b = m.lora_A[INIT_ADAPTER].weight, m.lora_B[INIT_ADAPTER].weight
    if a.shape != m.lora_A["default"].weight.shape:
        return a.shape[0], m.lora_A["default"].weight.shape[0]
    dora = {k: bool(m.use_dora.get(k)) for k in (INIT_ADAPTER, "default")}
    if dora[INIT_ADAPTER] != dora["default"]:
        kinds = {True: "DoRA", False: "LoRA"}
        raise ConfigError(
            f"{where} is a {kinds[dora[INIT_ADAPTER]]} file but the run trains adapter={kinds[dora['default']].lower()}; "
            f"use adapter={kinds[dora[INIT_ADAPTER]].lower()} to continue from it."
        )
    m.lora_A["default"].weight.copy_(a)
    m.lora_B["default"].weight.copy_(b * (m.scaling[INIT_ADAPTER] / m.scaling["default"]))
    if dora["default"]:  # DoRA: the magnitude of each output row too
        m.lora_magnitude_vector["default"].weight.copy_(m.lora_magnitude_vector[INIT_ADAPTER].weight)
    return None


def _check_moved(where: str, moved: int, bad_rank: list[tuple[str, int, int]], untargeted: list[str]) -> None:
    """ConfigError when a layer had another rank, a layer of the file is not one the run targets, or none moved."""
    from diffusion_lab.utils.errors import ConfigError

    if bad_rank:
        layer, r_file, r_run = bad_rank[0]
        raise ConfigError(f"{where} has rank {r_file} at {layer} but adapter.rank={r_run}; set adapter.rank={r_file} to continue from this file.")
    if untargeted:
        raise ConfigError(
            f"{where} has LoRA layers the run does not target ({', '.join(untargeted[:3])}{' ...' if len(untargeted) > 3 else ''}); "
            f"set adapter.target_modules (and adapter.train_text_encoder) to the file's layers."
        )
    if not moved:
        raise ConfigError(
            f"{where}: none of its layers is a layer of this model's LoRA (a LoRA for another family or base?). Pass a LoRA "
            f"trained on the same model (model.pretrained)."
        )


def _delete_adapter(model: torch.nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every tuner layer of ``model`` and make ``default`` the active, trainable one."""
    for m in model.modules():
        if isinstance(m, BaseTunerLayer) and name in getattr(m, "lora_A", {}):
            m.delete_adapter(name)
        if isinstance(m, BaseTunerLayer):
            m.set_adapter("default")
    getattr(model, "peft_config", {}).pop(name, None)


def init_adapter_from(module, path: str) -> int:
    """``adapter.init_from``: ``init_lora_from`` on a ``LatentDiffusion`` module's LoRA parts (backbone + the
    text encoders carrying one), read through the module's own pipeline (``export.build_pipeline``)."""
    from diffusion_lab.export.pipelines import build_pipeline
    from diffusion_lab.utils.errors import ConfigError

    backbone, family = module.base_backbone, module.family
    variant = adapter_variant(backbone)
    if variant not in ("lora", "dora"):
        raise ConfigError(f"adapter.init_from={path} continues a LoRA, but the run trains {'adapter=' + variant if variant else 'no LoRA'}; use adapter=lora (or dora).")
    parts = {family.backbone_name: backbone, **{n: e for n, e in zip(family.encoder_names, module.conditioner.encoders) if has_lora(e)}}
    return init_lora_from(path, build_pipeline(module), parts)
