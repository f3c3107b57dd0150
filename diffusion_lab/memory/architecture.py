"""What the memory plan needs to know about a model, read from its config alone: the backbone
built on the meta device (no weights, no download) and its parameter counts (the bytes its
training step saves for backward: ``memory/trace.py``).

    arch = load_architecture(cfg.plan.architecture)          # a shipped conf/plan/architecture/*.yaml
    arch = load_architecture(folder="outputs/tiny_flux")     # a diffusers folder's config.json files
    counts = backbone_counts(arch, lora=lora_config(...))    # parameters, Linear weights, blocks
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from diffusion_lab.memory.budget import Counts
from diffusion_lab.utils.errors import ConfigError

Family = Literal["latent_sd", "latent_sdxl", "latent_sd3", "latent_flux", "latent_qwen"]

# pipeline class (model_index.json) -> (family, backbone subfolder)
PIPELINES: dict[str, tuple[Family, str]] = {
    "StableDiffusionPipeline": ("latent_sd", "unet"),
    "StableDiffusionXLPipeline": ("latent_sdxl", "unet"),
    "StableDiffusion3Pipeline": ("latent_sd3", "transformer"),
    "FluxPipeline": ("latent_flux", "transformer"),
    "QwenImagePipeline": ("latent_qwen", "transformer"),
}
FROZEN_SUBFOLDERS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
# text tokens the backbone attends to when the folder does not say (the pipelines' defaults)
TEXT_TOKENS: dict[str, int] = {"latent_sd": 77, "latent_sdxl": 77, "latent_sd3": 77 + 256, "latent_flux": 512, "latent_qwen": 512}


@dataclass
class Architecture:
    """A model as the planner sees it: the backbone's class and config, and the frozen parts
    (VAE, text encoders), each a class + config to build on meta or a published parameter count."""

    name: str
    family: Family
    backbone_class: str
    backbone_config: dict
    frozen: dict[str, dict] = field(default_factory=dict)  # name -> {class_name, config} | {params, source}
    vae_factor: int = 8
    text_tokens: int = 77
    published_params: float | None = None  # the backbone's published total (params + persistent buffers)


def load_architecture(spec: Any = None, folder: str | Path | None = None) -> Architecture:
    """From a shipped ``conf/plan/architecture/<name>.yaml`` node (``spec``) or a diffusers
    pipeline ``folder`` (its ``model_index.json`` and each part's ``config.json``)."""
    if spec is not None:
        s = dict(spec)
        return Architecture(
            name=s["name"],
            family=s["family"],
            backbone_class=s["backbone"]["class_name"],
            backbone_config={k: v for k, v in dict(s["backbone"]["config"]).items()},
            frozen={k: dict(v) for k, v in dict(s.get("frozen") or {}).items()},
            vae_factor=int(s.get("vae_factor", 8)),
            text_tokens=int(s.get("text_tokens", 77)),
            published_params=s["backbone"].get("published_params"),
        )
    root = Path(str(folder)).expanduser()
    index = root / "model_index.json"
    if not index.is_file():
        raise ConfigError(
            f"model.pretrained={str(folder)!r} is not a diffusers pipeline folder (no model_index.json), so the plan cannot read "
            f"its architecture. Point model.pretrained at a pipeline folder (its *.json files are enough: "
            f"`hf download <hub id> --include '*.json' --local-dir DIR`), or pick a shipped one: "
            f"plan/architecture=sd15|sdxl|sd35_medium|sd35_large|flux1_dev|qwen_image."
        )
    pipeline = json.loads(index.read_text()).get("_class_name", "")
    if pipeline not in PIPELINES:
        raise ConfigError(f"{root}/model_index.json holds a {pipeline or 'unnamed'} pipeline; the plan knows {', '.join(PIPELINES)}.")
    family, sub = PIPELINES[pipeline]
    backbone = json.loads((root / sub / "config.json").read_text())
    frozen = {}
    for part in FROZEN_SUBFOLDERS:
        config = root / part / "config.json"
        if config.is_file():
            c = json.loads(config.read_text())
            frozen[part] = {"class_name": _part_class(c), "config": c}
    vae_factor = 2 ** (len(frozen["vae"]["config"].get("block_out_channels", [0] * 4)) - 1) if "vae" in frozen else 8
    return Architecture(
        name=str(root), family=family, backbone_class=f"diffusers.{backbone['_class_name']}", backbone_config=backbone,
        frozen=frozen, vae_factor=vae_factor, text_tokens=TEXT_TOKENS[family],  # the pipeline's default, also for tiny folders
    )


def _part_class(config: dict) -> str:
    if "_class_name" in config:
        return f"diffusers.{config['_class_name']}"
    return f"transformers.{config['architectures'][0]}"


def _get_class(name: str):
    module, _, cls = name.rpartition(".")
    return getattr(__import__(module, fromlist=[cls]), cls)


def build_meta(class_name: str, config: dict) -> torch.nn.Module:
    """The module of ``class_name`` with ``config``, its parameters on the meta device."""
    cls = _get_class(class_name)
    with torch.device("meta"):
        if class_name.startswith("diffusers."):
            return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        import transformers

        c = dict(config)
        model_type = c.pop("model_type")
        return cls(transformers.AutoConfig.for_model(model_type, **{k: v for k, v in c.items() if not k.startswith("_")}))


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def state_numel(module: torch.nn.Module) -> int:
    """Parameters + persistent buffers: what a checkpoint holds (SD3's pos_embed table is a buffer)."""
    persistent = 0
    for m in module.modules():
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                persistent += b.numel()
    return sum(p.numel() for p in module.parameters()) + persistent


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated units diffusers checkpoints and FSDP wraps: transformer blocks, or the UNet's
    resnets and attentions."""
    units = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        units += list(getattr(model, name, []))
    for level in list(getattr(model, "down_blocks", [])) + [getattr(model, "mid_block", None)] + list(getattr(model, "up_blocks", [])):
        if level is None:
            continue
        units += list(getattr(level, "resnets", [])) + list(getattr(level, "attentions", []))
    return units


def backbone_model(arch: Architecture, lora=None) -> torch.nn.Module:
    model = build_meta(arch.backbone_class, arch.backbone_config)
    if lora is not None:
        from diffusion_lab.components.adapters import add_lora

        with torch.device("meta"):
            add_lora(model, lora)
    return model


def _linear_weights(model: torch.nn.Module) -> int:
    """nn.Linear weights outside adapter layers (the base layer of a LoRA counts)."""
    total = 0
    for name, m in model.named_modules():
        if type(m) is torch.nn.Linear and "lora_" not in name:
            total += m.weight.numel()
    return total


def backbone_counts(arch: Architecture, lora=None) -> Counts:
    """Counts of ``arch``'s backbone (with ``lora``, a peft config, injected) and frozen parts."""
    model = backbone_model(arch, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if lora is not None else 0
    params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    blocks = _blocks(model)
    frozen, frozen_linear = {}, {}
    for part, spec in arch.frozen.items():
        if "params" in spec:
            frozen[part] = int(spec["params"])
            frozen_linear[part] = int(spec.get("linear_params", 0))
        else:
            m = build_meta(spec["class_name"], dict(spec["config"]))
            frozen[part] = state_numel(m)
            frozen_linear[part] = _linear_weights(m)
    return Counts(
        params=params,
        buffers=state_numel(model) - sum(p.numel() for p in model.parameters()),
        linear=_linear_weights(model),
        trainable_adapter=trainable,
        largest_block=max((sum(p.numel() for p in b.parameters()) for b in blocks), default=params),
        largest_param=max(p.numel() for p in model.parameters()),
        frozen=frozen,
        frozen_linear=frozen_linear,
    )
