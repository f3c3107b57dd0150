"""LoKr / LoHa exports (``adapter=lokr|loha``): the formats their loaders read.

| variant | file | loads with |
|---|---|---|
| LoKr | ``pytorch_lora_weights.safetensors`` (peft keys ``...to_q.lokr_w1``, config in the header) | ``pipe.unet.load_lora_adapter(dir, prefix=None, weight_name="pytorch_lora_weights.safetensors")`` (``pipe.transformer`` for transformer families) |
| LoKr, LoHa | ``unet/`` or ``transformer/`` (+ ``text_encoder/``): ``adapter_config.json`` + ``adapter_model.safetensors`` | ``PeftModel.from_pretrained(pipe.unet, dir / "unet")`` (``.merge_and_unload()``) |
| LoKr, LoHa | ``fused/`` (``adapter.export_fused``) | ``DiffusionPipeline.from_pretrained(dir / "fused")`` |
| LoKr (FLUX.2 [klein], Z-Image) | ``lora_kohya.safetensors``: LyCORIS keys (``lycoris_transformer_blocks_0_attn_to_q.lokr_w1``; Z-Image: ``diffusion_model.layers.0.attention.to_q.lokr_w1``) | ``pipe.load_lora_weights(dir, weight_name="lora_kohya.safetensors")`` (``export/kohya.py``) |

``callbacks.export.lora_format``: ``diffusers`` = the peft files above, ``kohya`` = the LyCORIS file only (LoKr on
FLUX.2 [klein] / Z-Image; refused before training elsewhere), ``both`` = each where it can be written.

``pipe.load_lora_weights`` refuses both (diffusers 0.42 reads LoRA/DoRA keys only); the UNet-level
``load_lora_adapter`` reads LoKr. LoRA and DoRA go through ``pipelines.save_lora``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from diffusion_lab.components.adapters import adapter_variant, has_lora, lora_metadata

PEFT_PREFIX = "base_model.model."  # the key prefix of a PeftModel's saved adapter


def peft_parts(module) -> dict[str, torch.nn.Module]:
    """``{"unet" | "transformer": ..., "text_encoder": ..., ...}``: the parts that carry an adapter, named as
    the family's pipeline names its components."""
    family = module.family
    encoders = zip(family.encoder_names, module.conditioner.encoders)
    return {name: m for name, m in [(family.backbone_name, module.base_backbone), *encoders] if has_lora(m)}


def save_peft_folder(model: torch.nn.Module, out_dir: str | Path) -> None:
    """``model``'s adapter ``default`` as the folder peft's ``PeftModel.save_pretrained`` writes
    (``adapter_config.json`` + ``adapter_model.safetensors``, keys under ``base_model.model.``)."""
    out_dir = Path(out_dir)
    model.peft_config["default"].save_pretrained(str(out_dir))
    state = {PEFT_PREFIX + k: v.detach().float().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})


def save_adapter_variant(module, out_dir: str | Path, lora_format: str = "both") -> None:
    """A LoKr/LoHa run's adapter into ``out_dir`` in ``lora_format`` (table above; ``fused/`` is the caller's)."""
    from diffusion_lab.export.lycoris import save_lycoris

    lycoris = None
    if lora_format != "diffusers" and adapter_variant(module.base_backbone) == "lokr":
        lycoris = save_lycoris(module.family.pipeline_class, str(out_dir), module.base_backbone)
    if lora_format == "kohya" and lycoris is not None:
        return
    parts = peft_parts(module)
    for name, model in parts.items():
        save_peft_folder(model, Path(out_dir) / name)
    if adapter_variant(module.base_backbone) == "lokr":
        save_lora_adapter_file(module.base_backbone, out_dir)


def save_lora_adapter_file(model: torch.nn.Module, out_dir: str | Path) -> None:
    """``out_dir/pytorch_lora_weights.safetensors`` as diffusers' ``model.save_lora_adapter`` writes it (peft
    keys, the adapter config as JSON under ``lora_adapter_metadata`` in the header), which
    ``load_lora_adapter`` reads. Written here because diffusers 0.42's ``save_lora_adapter`` calls
    ``model.to(dtype=None)`` first, which a quantized base (QLoRA) refuses; only the adapter is read.
    The adapter weights keep their dtype (fp32 even on a half-precision or quantized base)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE

    config = {k: sorted(v) if isinstance(v, set) else v for k, v in lora_metadata(model).items()}
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model, adapter_name="default").items()}
    metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file(state, str(Path(out_dir) / LORA_WEIGHT_NAME_SAFE), metadata=metadata)


def is_adapter_variant(module) -> bool:
    """A LoKr / LoHa run (``adapter=lokr|loha``): exported here, not as a LoRA file."""
    unet = getattr(module, "base_backbone", None)
    return unet is not None and adapter_variant(unet) in ("lokr", "loha")


def export_adapter_variant(module, out_dir: str | Path, lora_format: str = "both") -> None:
    """``out_dir`` (atomically): ``save_adapter_variant`` and, with ``adapter.export_fused``, ``fused/``."""
    from diffusion_lab.export.pipelines import build_pipeline
    from diffusion_lab.utils.io import atomic_dir

    with atomic_dir(out_dir) as tmp:
        save_adapter_variant(module, tmp, lora_format)
        if module.hparams.get("export_fused"):
            build_pipeline(module, fused=True).save_pretrained(Path(tmp) / "fused", safe_serialization=True)
