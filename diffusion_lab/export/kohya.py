"""LoRA files in the kohya / A1111 key layout (``lora_kohya.safetensors``), one writer per pipeline class.

A1111, Forge and ComfyUI read LoRA files whose keys name the *original* (non-diffusers) modules:
``<prefix>_<module path with "_">.lora_down.weight`` ``[r, in]``, ``.lora_up.weight`` ``[out, r]`` and
``.alpha`` (the update is ``alpha / r * up @ down``). The prefixes are ``lora_unet`` (the backbone),
``lora_te1`` / ``lora_te2`` (the CLIP text encoders; SD 1.x: ``lora_te``).

- SD 1.x / 2.x: diffusers' ``convert_state_dict_to_kohya`` names (``components/adapters.kohya_state_dict``).
- SDXL: kohya trains on the SGM UNet, so the UNet paths are SGM's (``input_blocks.4.1`` = diffusers'
  ``down_blocks.1.attentions.0``); inside a transformer block the names agree. Read back by diffusers'
  ``_maybe_map_sgm_blocks_to_diffusers`` + ``_convert_non_diffusers_lora_to_diffusers``.
- FLUX.1: the paths are BFL's (``double_blocks.i.img_attn.qkv`` ...), where q, k, v (and a single
  block's MLP input) are one fused linear: their LoRAs are written as one LoRA of the summed rank with
  a block-diagonal up matrix, which ``_convert_kohya_flux_lora_to_diffusers`` splits back exactly.
  That converter hard-codes FLUX.1's widths for a single block's ``linear1`` (3072 x 3 + 12288), so
  diffusers reads such a file only for full-size FLUX.1 (ComfyUI reads it at any width). Chroma and FLUX.1
  Kontext share the names and the reader (``FluxLoraLoaderMixin``).
- FLUX.2 [klein]: BFL names too (``_convert_kohya_flux2_lora_to_diffusers``); its single blocks' linears are
  fused in diffusers already (``attn.to_qkv_mlp_proj`` = ``linear1``, ``attn.to_out`` = ``linear2``).
- Qwen-Image (+ Edit), Z-Image: ``lora_unet_<diffusers path with "_">`` (musubi-tuner's names), which
  their readers split back at the underscores they know; each name is read back when written.
- No kohya file: SD3 / SD3.5 and Sana (diffusers 0.42 has no non-diffusers reader for them to check one).

The key tables and conversions are ``export/kohya_layout.py``; LoKr runs' LyCORIS keys (FLUX.2 [klein],
Z-Image, whose loaders read them back) ``export/lycoris.py``.

``save_lora_files`` writes a run's files in ``callbacks.export.lora_format`` (``diffusers|kohya|both``);
``check_lora_format`` refuses, before training, a kohya-only export that cannot be written. Not for
DoRA (diffusers 0.42's pipelines drop a kohya ``dora_scale`` on load, so nothing here can check one),
LoHa (no ``hada_*`` reader in diffusers), or LoKr on the other families (no LyCORIS reader for them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Literal

import torch

from diffusion_lab.components.adapters import KOHYA_FILE, adapter_variant, has_lora
from diffusion_lab.export.kohya_layout import FLUX2_NAMES, entry, flux_kohya, lora_layers, metadata, sdxl_kohya
from diffusion_lab.export.lycoris import LOKR_NAMES, lokr_state
from diffusion_lab.utils.errors import ConfigError

log = logging.getLogger(__name__)


# ---- one writer per pipeline class: (backbone, {encoder name: encoder}) -> kohya state dict -----------
Build = Callable[[torch.nn.Module, dict[str, torch.nn.Module]], dict[str, torch.Tensor]]


def sd_state(unet: torch.nn.Module, encoders: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """SD 1.x / 2.x: diffusers' ``convert_state_dict_to_kohya`` names (``components/adapters.kohya_state_dict``)."""
    from diffusion_lab.components.adapters import kohya_state_dict

    lora_layers(unet)  # ValueError for DoRA
    return kohya_state_dict({"unet": unet, **encoders})


def sdxl_state(unet: torch.nn.Module, encoders: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return sdxl_kohya(lora_layers(unet), unet.config.layers_per_block, {n: lora_layers(e) for n, e in encoders.items()})


def flux_state(transformer: torch.nn.Module, encoders: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    te = lora_layers(encoders["text_encoder"]) if "text_encoder" in encoders else None
    return flux_kohya(lora_layers(transformer), lambda p: transformer.get_submodule(p).out_features, te)


def flux2_state(transformer: torch.nn.Module, encoders: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    if encoders:
        raise ValueError("Flux2KleinPipeline's LoRA loader has no text encoder slot")
    return flux_kohya(lora_layers(transformer), lambda p: transformer.get_submodule(p).out_features, None, FLUX2_NAMES)


def flat_state(pipeline_class: str) -> Build:
    """``lora_unet_<diffusers module path with "_">`` (Qwen-Image, Z-Image: kohya's / musubi-tuner's names,
    which diffusers' non-diffusers readers split back at the underscores they know). Each name is read back
    through ``<pipeline_class>.lora_state_dict`` when written; a path it does not split back is a ValueError."""

    def build(backbone: torch.nn.Module, encoders: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
        import diffusers

        if encoders:
            raise ValueError(f"{pipeline_class}'s LoRA loader has no text encoder slot")
        layers = lora_layers(backbone)
        out = {}
        for path, (down, up, scale) in layers.items():
            out.update(entry("lora_unet_" + path.replace(".", "_"), down, up, scale))
        read = getattr(diffusers, pipeline_class).lora_state_dict(dict(out))
        lost = sorted(p for p in layers if f"transformer.{p}.lora_A.weight" not in read)
        if lost:
            raise ValueError(f"no kohya name {pipeline_class} reads back for the LoRA of {', '.join(lost)} (adapter.target_modules)")
        return out

    return build


WRITERS: dict[str, Build] = {
    "StableDiffusionPipeline": sd_state,
    "StableDiffusionXLPipeline": sdxl_state,
    "FluxPipeline": flux_state,
    "FluxKontextPipeline": flux_state,
    "ChromaPipeline": flux_state,
    "Flux2KleinPipeline": flux2_state,
    "QwenImagePipeline": flat_state("QwenImagePipeline"),
    "QwenImageEditPipeline": flat_state("QwenImageEditPipeline"),
    "ZImagePipeline": flat_state("ZImagePipeline"),
}
LoraFormat = Literal["diffusers", "kohya", "both"]
LORA_FORMATS: tuple[str, ...] = ("diffusers", "kohya", "both")
FORMAT_KEY = "callbacks.export.lora_format"


def kohya_state(pipeline_class: str, backbone: torch.nn.Module, encoders: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The kohya state dict of a ``pipeline_class`` run's LoRA; ValueError when the family has no kohya
    layout here, for DoRA, or for a target without a kohya name."""
    if pipeline_class not in WRITERS:
        raise ValueError(f"{pipeline_class} has no kohya / A1111 LoRA layout that diffusers reads back (kohya files: {', '.join(WRITERS)})")
    return WRITERS[pipeline_class](backbone, encoders)


def save_kohya(pipeline_class: str, out_dir: str, backbone: torch.nn.Module, encoders: dict[str, torch.nn.Module], strict: bool = False) -> Path | None:
    """Write ``<out_dir>/lora_kohya.safetensors``. Where none can be written (no layout, DoRA, a target
    without a kohya name): None with a warning, or the ValueError with ``strict``."""
    from safetensors.torch import save_file

    try:
        state = kohya_state(pipeline_class, backbone, encoders)
    except ValueError as e:
        if strict:
            raise
        log.warning("no %s: %s", KOHYA_FILE, e)
        return None
    path = Path(out_dir) / KOHYA_FILE
    save_file(state, str(path), metadata=metadata(lora_layers(backbone)))
    return path


def save_lora_files(family, out_dir: str, backbone: torch.nn.Module, encoders: dict[str, torch.nn.Module], lora_format: LoraFormat = "both") -> None:
    """A LoRA run's files in ``lora_format``: ``diffusers`` = the pipeline's ``save_lora_weights`` file
    (``family.save_lora``), ``kohya`` = ``lora_kohya.safetensors`` only, ``both`` = each (the kohya one where
    the family has a layout). A ``kohya`` export that cannot be written (checked before training by
    ``check_lora_format``) falls back to diffusers' file with a warning rather than lose the run."""
    if lora_format != "kohya":
        family.save_lora(out_dir, backbone, encoders)
    if lora_format == "diffusers":
        return
    if save_kohya(family.pipeline_class, out_dir, backbone, encoders) is None and lora_format == "kohya":
        log.warning("%s=kohya: writing diffusers' LoRA file instead", FORMAT_KEY)
        family.save_lora(out_dir, backbone, encoders)


def lora_encoders(module) -> dict[str, torch.nn.Module]:
    """The text encoders of ``module`` that carry a LoRA, named as the family's pipeline names them."""
    return {name: e for name, e in zip(module.family.encoder_names, module.conditioner.encoders) if has_lora(e)}


def check_lora_format(lora_format: str, module) -> None:
    """ConfigError before training: an unknown format, or ``kohya`` for a LoRA run whose file cannot be
    written (a family without a kohya layout, DoRA, LoKr / LoHa, a target with no kohya name). The
    check builds the file's state dict from the freshly injected (untrained) layers."""
    if lora_format not in LORA_FORMATS:
        raise ConfigError(f"{FORMAT_KEY}={lora_format!r} is not one of {', '.join(LORA_FORMATS)}.")
    backbone = getattr(module, "base_backbone", None)
    if lora_format != "kohya" or backbone is None or not has_lora(backbone) or not hasattr(module, "family"):
        return
    family, variant = module.family, adapter_variant(backbone)
    if variant == "loha" or variant == "lokr" and family.pipeline_class not in LOKR_NAMES:
        raise ConfigError(
            f"{FORMAT_KEY}=kohya with adapter={variant} and model={family.name}: no LyCORIS file is written here (no reader "
            f"in diffusers or peft checks one; LoKr: {', '.join(LOKR_NAMES)} only); use {FORMAT_KEY}=diffusers (peft folders + fused/)."
        )
    try:
        if variant == "lokr":
            lokr_state(family.pipeline_class, backbone)
        else:
            kohya_state(family.pipeline_class, backbone, lora_encoders(module))
    except ValueError as e:
        raise ConfigError(
            f"{FORMAT_KEY}=kohya cannot be written for model={family.name} ({e}). Use {FORMAT_KEY}=diffusers (or both, "
            f"which writes the kohya file where it can), or change adapter / adapter.target_modules."
        ) from e
