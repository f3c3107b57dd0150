"""LoRA layers in the kohya / A1111 key layout: the name tables and the tensor conversions
(SD text encoders, SDXL's SGM UNet paths, FLUX.1 / FLUX.2's BFL names with fused linears). Which
writer a pipeline class uses, and the file: ``export/kohya.py``."""

from __future__ import annotations

import re
from typing import Callable

import torch
from peft.tuners.lora import LoraLayer

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


def entry(key: str, down: torch.Tensor, up: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    return {f"{key}.lora_down.weight": down.contiguous(), f"{key}.lora_up.weight": up.contiguous(), f"{key}.alpha": torch.tensor(scale * down.shape[0])}


def text_encoder_kohya(layers: Layers, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's LoRA as ``<prefix>_text_model_encoder_layers_0_self_attn_q_proj...``
    (``prefix``: ``lora_te1`` for the first / only CLIP, ``lora_te2`` for SDXL's second)."""
    out = {}
    for path, (down, up, scale) in layers.items():
        path = path if path.startswith("text_model.") else f"text_model.{path}"
        out.update(entry(f"{prefix}_{path.replace('.', '_')}", down, up, scale))
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
        out.update(entry("lora_unet_" + sgm_unet_path(path, layers_per_block).replace(".", "_"), down, up, scale))
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
                out.update(entry(f"{bfl}_{bfl_name}", *part))
        for bfl_name, fused in (single_fused if single else double_fused).items():
            parts = [left.pop(f"{block}.{n}", None) for n in fused]
            if any(p is not None for p in parts):
                in_features = next(p[0].shape[1] for p in parts if p is not None)
                widths = [p[1].shape[0] if p is not None else out_features(f"{block}.{n}") for p, n in zip(parts, fused)]
                out.update(entry(f"{bfl}_{bfl_name}", *_fused(parts, widths, in_features)))
    if left:
        raise ValueError(f"no kohya (BFL) name for the FLUX LoRA of {', '.join(sorted(left))}: LoRA on the transformer blocks only (adapter.target_modules)")
    if text_encoder:
        out.update(text_encoder_kohya(text_encoder, "lora_te1"))
    return out


def metadata(layers: Layers) -> dict[str, str]:
    """kohya's ``ss_*`` header fields (rank and alpha of the first layer) for tools that show them."""
    down, _, scale = next(iter(layers.values()))
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(down.shape[0]), "ss_network_alpha": f"{scale * down.shape[0]:g}"}
