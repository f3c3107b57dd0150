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

LoKr (``lokr_state``): LyCORIS keys for FLUX.2 [klein] and Z-Image, whose loaders read them back.

``save_lora_files`` writes a run's files in ``callbacks.export.lora_format`` (``diffusers|kohya|both``);
``check_lora_format`` refuses, before training, a kohya-only export that cannot be written. Not for
DoRA (diffusers 0.42's pipelines drop a kohya ``dora_scale`` on load, so nothing here can check one),
LoHa (no ``hada_*`` reader in diffusers), or LoKr on the other families (no LyCORIS reader for them).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable, Literal

import torch
from peft.tuners.lora import LoraLayer

from diffusion_lab.components.adapters import KOHYA_FILE, adapter_variant, has_lora
from diffusion_lab.utils.errors import ConfigError

log = logging.getLogger(__name__)
# module path -> (down [r, in], up [out, r], scale alpha / r)
Layers = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def lora_layers(model: torch.nn.Module) -> Layers:
    """The LoRA (adapter ``default``) of every layer of ``model``, with peft's scale per layer (so a
    ``rank_pattern`` / ``alpha_pattern`` is kept). ValueError for DoRA, which has no checked kohya layout."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            if m.use_dora.get("default"):
                raise ValueError(f"{name}: DoRA has no kohya file here (diffusers cannot read its dora_scale back for a check)")
            layers[name] = (m.lora_A["default"].weight.detach().float().cpu(), m.lora_B["default"].weight.detach().float().cpu(), float(m.scaling["default"]))
    return layers


def _entry(key: str, down: torch.Tensor, up: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    return {f"{key}.lora_down.weight": down.contiguous(), f"{key}.lora_up.weight": up.contiguous(), f"{key}.alpha": torch.tensor(scale * down.shape[0])}


def text_encoder_kohya(layers: Layers, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's LoRA as ``<prefix>_text_model_encoder_layers_0_self_attn_q_proj...``
    (``prefix``: ``lora_te1`` for the first / only CLIP, ``lora_te2`` for SDXL's second)."""
    out = {}
    for path, (down, up, scale) in layers.items():
        path = path if path.startswith("text_model.") else f"text_model.{path}"
        out.update(_entry(f"{prefix}_{path.replace('.', '_')}", down, up, scale))
    return out


def sgm_unet_path(path: str, layers_per_block: int) -> str:
    """A diffusers UNet module path -> the SGM (original SDXL) one, for modules inside the attention
    blocks (the LoRA targets here): ``down_blocks.1.attentions.0.x`` -> ``input_blocks.4.1.x`` at 2
    layers per block, ``mid_block.attentions.0.x`` -> ``middle_block.1.x``, ``up_blocks.b.attentions.j.x``
    -> ``output_blocks.{b (L+1) + j}.1.x`` (the inverse of diffusers' ``_maybe_map_sgm_blocks_to_diffusers``)."""
    n = layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        return f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", path):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        return f"output_blocks.{int(m[1]) * n + int(m[2])}.1.{m[3]}"
    raise ValueError(f"{path}: only LoRA inside the UNet's attention blocks has an SGM (kohya SDXL) name here; target attention modules (adapter.target_modules)")


def sdxl_kohya(unet_layers: Layers, layers_per_block: int, encoders: dict[str, Layers] | None = None) -> dict[str, torch.Tensor]:
    """SDXL's UNet (SGM names) and text encoders (``text_encoder`` -> ``lora_te1``, ``text_encoder_2`` ->
    ``lora_te2``) in the kohya layout."""
    out = {}
    for path, (down, up, scale) in unet_layers.items():
        out.update(_entry("lora_unet_" + sgm_unet_path(path, layers_per_block).replace(".", "_"), down, up, scale))
    prefixes = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    for name, layers in (encoders or {}).items():
        out.update(text_encoder_kohya(layers, prefixes[name]))
    return out


# FLUX.1: BFL's name of each diffusers module (per block), and the fused linears (parts in BFL's order)
_FLUX_DOUBLE = {
    "attn.to_out.0": "img_attn_proj", "ff.net.0.proj": "img_mlp_0", "ff.net.2": "img_mlp_2", "norm1.linear": "img_mod_lin",
    "attn.to_add_out": "txt_attn_proj", "ff_context.net.0.proj": "txt_mlp_0", "ff_context.net.2": "txt_mlp_2", "norm1_context.linear": "txt_mod_lin",
}
_FLUX_DOUBLE_FUSED = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_FLUX_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation_lin"}
_FLUX_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
# FLUX.2 (``_convert_kohya_flux2_lora_to_diffusers``): the single blocks' linears are already fused in diffusers
_FLUX2_DOUBLE = {
    "attn.to_out.0": "img_attn_proj", "ff.linear_in": "img_mlp_0", "ff.linear_out": "img_mlp_2",
    "attn.to_add_out": "txt_attn_proj", "ff_context.linear_in": "txt_mlp_0", "ff_context.linear_out": "txt_mlp_2",
}
_FLUX2_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
FLUX1_NAMES = (_FLUX_DOUBLE, _FLUX_DOUBLE_FUSED, _FLUX_SINGLE, _FLUX_SINGLE_FUSED)
FLUX2_NAMES = (_FLUX2_DOUBLE, _FLUX_DOUBLE_FUSED, _FLUX2_SINGLE, {})


def _fused(parts: list[tuple[torch.Tensor, torch.Tensor, float] | None], widths: list[int], in_features: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LoRAs of the parts of one fused linear -> one LoRA: downs stacked ``[sum r, in]``, ups block-diagonal
    ``[sum out, sum r]``, every part at the same rank (a part without LoRA, or of lower rank, is padded with
    zeros) so the reader's equal chunks are the parts. Each part's scale is folded into its up matrix
    relative to the first part's, which the alpha carries."""
    rank = max(p[0].shape[0] for p in parts if p is not None)
    scale = next(p[2] for p in parts if p is not None)
    downs, up = [], torch.zeros(sum(widths), rank * len(parts))
    row = 0
    for j, (part, width) in enumerate(zip(parts, widths)):
        down = torch.zeros(rank, in_features)
        if part is not None:
            d, u, s = part
            down[: d.shape[0]] = d
            up[row : row + width, j * rank : j * rank + d.shape[0]] = u * (s / scale)
        downs.append(down)
        row += width
    return torch.cat(downs), up, scale


def flux_kohya(layers: Layers, out_features: Callable[[str], int], text_encoder: Layers | None = None, names=FLUX1_NAMES) -> dict[str, torch.Tensor]:
    """A ``FluxTransformer2DModel``'s LoRA (``layers``) in BFL names (``lora_unet_double_blocks_0_img_attn_qkv``,
    ``lora_unet_single_blocks_0_linear1`` ...) and its CLIP encoder's as ``lora_te1_*``. ``out_features(path)``:
    the output width of a module without LoRA that shares a fused linear with one that has it. ``names``:
    ``FLUX1_NAMES`` (also Chroma, Kontext) or ``FLUX2_NAMES`` (double, double fused, single, single fused)."""
    double, double_fused, single_names, single_fused = names
    out, left = {}, dict(layers)
    blocks = sorted({m.group(0) for p in layers if (m := re.match(r"(single_)?transformer_blocks\.\d+", p))})
    for block in blocks:
        single = block.startswith("single_")
        bfl = f"lora_unet_{'single' if single else 'double'}_blocks_{block.rsplit('.', 1)[1]}"
        for name, bfl_name in (single_names if single else double).items():
            if (part := left.pop(f"{block}.{name}", None)) is not None:
                out.update(_entry(f"{bfl}_{bfl_name}", *part))
        for bfl_name, fused in (single_fused if single else double_fused).items():
            parts = [left.pop(f"{block}.{n}", None) for n in fused]
            if any(p is not None for p in parts):
                in_features = next(p[0].shape[1] for p in parts if p is not None)
                widths = [p[1].shape[0] if p is not None else out_features(f"{block}.{n}") for p, n in zip(parts, fused)]
                out.update(_entry(f"{bfl}_{bfl_name}", *_fused(parts, widths, in_features)))
    if left:
        raise ValueError(f"no kohya (BFL) name for the FLUX LoRA of {', '.join(sorted(left))}: LoRA on the transformer blocks only (adapter.target_modules)")
    if text_encoder:
        out.update(text_encoder_kohya(text_encoder, "lora_te1"))
    return out


def metadata(layers: Layers) -> dict[str, str]:
    """kohya's ``ss_*`` header fields (rank and alpha of the first layer) for tools that show them."""
    down, _, scale = next(iter(layers.values()))
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(down.shape[0]), "ss_network_alpha": f"{scale * down.shape[0]:g}"}


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
            out.update(_entry("lora_unet_" + path.replace(".", "_"), down, up, scale))
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


# ---- LoKr in LyCORIS keys (``.lokr_w1`` / ``.lokr_w2`` or their ``_a`` / ``_b`` factors) --------------------
_LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
# module path -> LyCORIS key prefix, for the pipelines whose loader reads LyCORIS LoKr keys back
LOKR_NAMES: dict[str, Callable[[str], str]] = {
    "Flux2KleinPipeline": lambda path: "lycoris_" + path.replace(".", "_"),  # LyCORIS on the diffusers model
    "ZImagePipeline": lambda path: "diffusion_model." + path,  # ai-toolkit: the diffusers paths
}


def lokr_state(pipeline_class: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s LoKr (adapter ``default``) as LyCORIS keys ``<name>.lokr_w1`` ... with peft's scale
    alpha / r baked into the first factor and no ``.alpha`` key (LyCORIS then applies none), read back through
    ``<pipeline_class>.lora_state_dict`` when written. ValueError: no LyCORIS reader for the pipeline, a
    Tucker (conv) factor, or a name the reader does not map back."""
    import diffusers
    from peft.tuners.lokr.layer import LoKrLayer

    if pipeline_class not in LOKR_NAMES:
        raise ValueError(f"{pipeline_class} has no LyCORIS LoKr reader in diffusers to check a file against (LyCORIS files: {', '.join(LOKR_NAMES)})")
    name, out, paths = LOKR_NAMES[pipeline_class], {}, []
    for path, m in model.named_modules():
        if not isinstance(m, LoKrLayer) or "default" not in m.lokr_w2 and "default" not in m.lokr_w2_a:
            continue
        if "default" in m.lokr_t2:
            raise ValueError(f"{path}: a Tucker-decomposed (conv) LoKr factor has no checked LyCORIS layout here")
        factors = {f: getattr(m, f)["default"].detach().float().cpu() for f in _LOKR_FACTORS if "default" in getattr(m, f)}
        first = "lokr_w1" if "lokr_w1" in factors else "lokr_w1_a"
        factors[first] = factors[first] * float(m.scaling["default"])
        out.update({f"{name(path)}.{f}": w.contiguous() for f, w in factors.items()})
        paths.append(path)
    read = getattr(diffusers, pipeline_class).lora_state_dict(dict(out))
    lost = [p for p in paths if not any(k.startswith(f"transformer.{p}.lokr_") for k in read)]
    if lost:
        raise ValueError(f"no LyCORIS name {pipeline_class} reads back for the LoKr of {', '.join(lost[:3])} (adapter.target_modules)")
    return out


def save_lycoris(pipeline_class: str, out_dir: str, model: torch.nn.Module) -> Path | None:
    """``<out_dir>/lora_kohya.safetensors`` of a LoKr run (LyCORIS keys); None with a warning where none can be written."""
    from safetensors.torch import save_file

    try:
        state = lokr_state(pipeline_class, model)
    except ValueError as e:
        log.warning("no %s: %s", KOHYA_FILE, e)
        return None
    path = Path(out_dir) / KOHYA_FILE
    save_file(state, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "lokr"}'})
    return path


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
