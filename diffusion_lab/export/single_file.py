"""Single-file checkpoints: a diffusers pipeline -> one ``.safetensors`` in the original key layout.

A1111 / Forge / ComfyUI read a full model as one file whose keys name the original (non-diffusers) modules;
``<Pipeline>.from_single_file(file, config=<pipeline folder or hub id>)`` reads it back.

| pipeline | file keys |
|---|---|
| ``StableDiffusionPipeline`` (SD 1.x) | ``model.diffusion_model.*`` (LDM UNet), ``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.text_model.*`` (CLIP) |
| ``StableDiffusionPipeline`` (SD 2.x: 1024-wide text) | UNet + VAE as above, ``cond_stage_model.model.*`` (OpenCLIP-H) |
| ``StableDiffusionXLPipeline`` | SGM UNet + VAE as above, ``conditioner.embedders.0.transformer.*`` (CLIP-L), ``conditioner.embedders.1.model.*`` (OpenCLIP-G) |
| ``StableDiffusion3Pipeline`` / ``FluxPipeline`` | the transformer only: SAI's (``joint_blocks.*``) / BFL's names (``double_blocks.*``, ``single_blocks.*``), as ``flux1-dev.safetensors`` |

Each table inverts a reader of diffusers' ``loaders/single_file_utils.py`` (``convert_ldm_unet_checkpoint``, ``_vae_``,
``_clip_``, ``convert_open_clip_checkpoint``, ``convert_sd3_`` / ``convert_flux_transformer_checkpoint_to_diffusers``),
which tells SDXL's two CLIPs apart by width and splits FLUX's ``linear1`` at FLUX.1's width (3072): toys narrower than
the real models do not read back. Other families (Sana, Qwen-Image, ...) have none: ``save`` logs it, returns None.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"  # <run>/model.safetensors beside <run>/pipeline
# a rule: (regex fully matching a diffusers key, its original key: a re template or a function of the match)
Rule = tuple[str, "str | Callable[[re.Match], str]"]
# (original key, tensor, component config) -> the tensor as the original holds it (1x1 conv, transposed, ...)
Fix = Callable[[str, torch.Tensor, object], torch.Tensor]

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _sub(table: dict[str, str], rest: str) -> str:  # ``rest`` with its first path component renamed by ``table``
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def _ldm_unet(config) -> list[Rule]:
    """LDM / SGM UNet names of a ``UNet2DConditionModel``: block ``b``'s layer ``j`` is input block
    ``1 + b (L+1) + j`` and output block ``b (L+1) + j`` (``L`` = ``layers_per_block``); ``.0`` is the
    ResNet, ``.1`` the transformer, then the down/up sampler."""
    n, L = config.layers_per_block + 1, config.layers_per_block
    attn_up = [("Attn" in t) for t in config.up_block_types]
    return [
        (r"conv_in\.(.+)", r"input_blocks.0.0.\1"),
        (r"time_embedding\.linear_([12])\.(.+)", lambda m: f"time_embed.{2 * int(m[1]) - 2}.{m[2]}"),
        (r"(?:add|class)_embedding\.linear_([12])\.(.+)", lambda m: f"label_emb.0.{2 * int(m[1]) - 2}.{m[2]}"),
        (r"conv_norm_out\.(.+)", r"out.0.\1"),
        (r"conv_out\.(.+)", r"out.2.\1"),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda m: f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.0.{_sub(_RESNET, m[3])}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda m: f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.1.{m[3]}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda m: f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"),
        (r"mid_block\.resnets\.([01])\.(.+)", lambda m: f"middle_block.{2 * int(m[1])}.{_sub(_RESNET, m[2])}"),
        (r"mid_block\.attentions\.0\.(.+)", r"middle_block.1.\1"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda m: f"output_blocks.{int(m[1]) * n + int(m[2])}.0.{_sub(_RESNET, m[3])}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda m: f"output_blocks.{int(m[1]) * n + int(m[2])}.1.{m[3]}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", lambda m: f"output_blocks.{int(m[1]) * n + L}.{2 if attn_up[int(m[1])] else 1}.conv.{m[2]}"),
    ]


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def _ldm_vae(config) -> list[Rule]:
    """LDM VAE names of an ``AutoencoderKL``: the decoder's up blocks count from the bottom (``up_blocks.i`` = ``up.{n-1-i}``)."""
    top = len(config.up_block_types) - 1
    short = {"conv_shortcut": "nin_shortcut"}
    return [
        (r"(encoder|decoder)\.conv_norm_out\.(.+)", r"\1.norm_out.\2"),
        (r"((?:encoder|decoder)\.conv_(?:in|out)|quant_conv|post_quant_conv)\.(.+)", r"\1.\2"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{_sub(short, m[3])}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", r"encoder.down.\1.downsample.conv.\2"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda m: f"decoder.up.{top - int(m[1])}.block.{m[2]}.{_sub(short, m[3])}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", lambda m: f"decoder.up.{top - int(m[1])}.upsample.conv.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_sub(short, m[3])}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out)\.(?:0\.)?(.+)", lambda m: f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"),
    ]


def _vae_fix(key: str, t: torch.Tensor, config) -> torch.Tensor:  # LDM's attention: 1x1 convs [C, C, 1, 1]
    return t[:, :, None, None] if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", key) and t.ndim == 2 else t


def _hf_clip(config) -> list[Rule]:  # transformers' CLIP names under ``text_model.`` (5.6+ drops it from CLIPTextModel)
    return [(r"(text_model\..+)", r"\1"), (r"(.+)", r"text_model.\1")]


_OPEN_CLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}


def _open_clip(config) -> list[Rule]:
    """OpenCLIP names (SDXL's 2nd encoder, SD 2.x's only one; ``text_model.`` optional): q, k, v are one ``attn.in_proj_*``."""
    return [
        (r"(?:text_model\.)?embeddings\.token_embedding\.(.+)", r"token_embedding.\1"),
        (r"(?:text_model\.)?embeddings\.position_embedding\.weight", "positional_embedding"),
        (r"(?:text_model\.)?final_layer_norm\.(.+)", r"ln_final.\1"),
        (r"text_projection\.weight", "text_projection"),
        (r"(?:text_model\.)?encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)", r"transformer.resblocks.\1.attn.in_proj_\2"),
        (r"(?:text_model\.)?encoder\.layers\.(\d+)\.(layer_norm[12]|mlp\.fc[12]|self_attn\.out_proj)\.(.+)", lambda m: f"transformer.resblocks.{m[1]}.{_OPEN_CLIP[m[2]]}.{m[3]}"),
    ]


def _open_clip_fix(key: str, t: torch.Tensor, config) -> torch.Tensor:  # OpenCLIP's projection is x @ P, [hidden, proj]
    return t.T.contiguous() if key == "text_projection" else t


# FLUX.1: diffusers module -> BFL module, per double block / single block / outside the blocks
_FLUX_DOUBLE = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    **dict.fromkeys(("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn.qkv"), **dict.fromkeys(("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn.qkv"),
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm", "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2", "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm", **dict.fromkeys(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear1")}
_FLUX_OUTER = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer", "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer", "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1",
}


def _alt(table: dict[str, str]) -> str:  # a regex alternation of the table's keys
    return "|".join(re.escape(k) for k in table)


def _bfl(blocks: str, table: dict[str, str], m: re.Match) -> str:
    """``<blocks>.<i>.<BFL module>.<weight|bias>``; BFL's QK RMS-norms hold a ``scale``, not a ``weight``."""
    name = f"{blocks}.{m[1]}.{table[m[2]]}.{m[3]}"
    return name.removesuffix("weight") + "scale" if name.endswith("_norm.weight") else name


def _bfl_flux(config) -> list[Rule]:
    """BFL names of a ``FluxTransformer2DModel``; q, k, v (and a single block's MLP input) are one linear."""
    return [
        (rf"transformer_blocks\.(\d+)\.({_alt(_FLUX_DOUBLE)})\.(weight|bias)", lambda m: _bfl("double_blocks", _FLUX_DOUBLE, m)),
        (rf"single_transformer_blocks\.(\d+)\.({_alt(_FLUX_SINGLE)})\.(weight|bias)", lambda m: _bfl("single_blocks", _FLUX_SINGLE, m)),
        (rf"({_alt(_FLUX_OUTER)})\.(weight|bias)", lambda m: f"{_FLUX_OUTER[m[1]]}.{m[2]}"),
    ]


def _swap_halves(key: str, t: torch.Tensor, config) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous emits (scale, shift), BFL's / SAI's final layer (shift, scale);
    so does SD3's last block, whose context stream only modulates (``context_pre_only``)."""
    last = f"joint_blocks.{getattr(config, 'num_layers', 0) - 1}.context_block.adaLN_modulation"
    return torch.cat(t.chunk(2)[::-1]) if key.startswith(("final_layer.adaLN_modulation", last)) else t


# SD3 / SD3.5 (SAI's MMDiT): diffusers module -> SAI module, per joint block / outside the blocks
_SD3_BLOCK = {
    **dict.fromkeys(("attn.to_q", "attn.to_k", "attn.to_v"), "x_block.attn.qkv"), "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.to_out.0": "x_block.attn.proj", "norm1.linear": "x_block.adaLN_modulation.1", "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    **dict.fromkeys(("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "context_block.attn.qkv"), "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k", "attn.to_add_out": "context_block.attn.proj", "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
    **dict.fromkeys(("attn2.to_q", "attn2.to_k", "attn2.to_v"), "x_block.attn2.qkv"), "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k", "attn2.to_out.0": "x_block.attn2.proj",
}
_SD3_OUTER = {
    "pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder", "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0", "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
}


def _sai_sd3(config) -> list[Rule]:
    """SAI's names of an ``SD3Transformer2DModel`` (``joint_blocks.i.x_block`` / ``.context_block``; SD3.5's
    second attention ``x_block.attn2``); q, k, v are one ``qkv`` linear."""
    return [
        (r"pos_embed\.pos_embed", "pos_embed"),
        (rf"transformer_blocks\.(\d+)\.({_alt(_SD3_BLOCK)})\.(weight|bias)", lambda m: f"joint_blocks.{m[1]}.{_SD3_BLOCK[m[2]]}.{m[3]}"),
        (rf"({_alt(_SD3_OUTER)})\.(weight|bias)", lambda m: f"{_SD3_OUTER[m[1]]}.{m[2]}"),
    ]


# the order of the parts of a fused tensor (by the diffusers module name they come from)
_PART_ORDER = {name: i for i, name in enumerate(("to_q", "q_proj", "add_q_proj", "to_k", "k_proj", "add_k_proj", "to_v", "v_proj", "add_v_proj", "proj_mlp"))}

_SD_UNET_VAE = [("unet", "model.diffusion_model.", _ldm_unet, None), ("vae", "first_stage_model.", _ldm_vae, _vae_fix)]
# pipeline class -> (component, prefix in the file, rules of the component's config, fix)
LAYOUTS: dict[str, list[tuple[str, str, Callable, Fix | None]]] = {
    "StableDiffusionPipeline": [*_SD_UNET_VAE, ("text_encoder", "cond_stage_model.transformer.", _hf_clip, None)],
    "StableDiffusionPipeline/v2": [*_SD_UNET_VAE, ("text_encoder", "cond_stage_model.model.", _open_clip, _open_clip_fix)],
    "StableDiffusionXLPipeline": [
        *_SD_UNET_VAE, ("text_encoder", "conditioner.embedders.0.transformer.", _hf_clip, None), ("text_encoder_2", "conditioner.embedders.1.model.", _open_clip, _open_clip_fix),
    ],
    "StableDiffusion3Pipeline": [("transformer", "", _sai_sd3, _swap_halves)],
    **dict.fromkeys(("FluxPipeline", "FluxKontextPipeline"), [("transformer", "", _bfl_flux, _swap_halves)]),
}


def convert(state: dict[str, torch.Tensor], rules: list[Rule], prefix: str = "", fix: Fix | None = None, config=None) -> dict[str, torch.Tensor]:
    """A diffusers state dict -> original keys (``prefix`` + the first rule matching each key); keys mapped to one
    original key are concatenated along dim 0 in ``_PART_ORDER``. KeyError for a key no rule matches."""
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, t in state.items():
        for pattern, repl in rules:
            if m := re.fullmatch(pattern, key):
                new = repl(m) if callable(repl) else m.expand(repl)
                parts.setdefault(new, []).append((_PART_ORDER.get(key.rsplit(".", 2)[-2], 0), t))
                break
        else:
            raise KeyError(f"{key}: no original (single-file) name for this diffusers key")
    out = {}
    for new, ts in parts.items():
        t = torch.cat([t for _, t in sorted(ts, key=lambda p: p[0])]) if len(ts) > 1 else ts[0][1]
        out[prefix + new] = fix(new, t, config) if fix else t
    return out


def single_file_state(pipe) -> dict[str, torch.Tensor] | None:
    """The single-file state dict of a diffusers pipeline (``LAYOUTS``; the tensors' dtype and device as the
    pipeline's, meta included); None for a pipeline class without one."""
    name = type(pipe).__name__
    if name == "StableDiffusionPipeline" and pipe.unet.config.cross_attention_dim == 1024:  # SD 2.x, as diffusers tells v2
        name += "/v2"
    if (layout := LAYOUTS.get(name)) is None:
        return None
    out = {}
    for name, prefix, rules, fix in layout:
        model = getattr(pipe, name)
        out.update(convert(model.state_dict(), rules(model.config), prefix, fix, model.config))
    return out


def save(pipe, path: str | Path) -> Path | None:
    """Write ``pipe`` as one original-layout ``.safetensors`` at ``path`` (atomically: an existing file is
    replaced only once the new one is whole). None (and a log line) for a family without a layout or a
    module the layout has no name for."""
    from safetensors.torch import save_file

    from diffusion_lab.utils.io import atomic_file

    try:
        state = single_file_state(pipe)
    except KeyError as e:  # a module this layout has no name for: the pipeline folder is still the export
        log.warning("no single-file checkpoint: %s (%s's original layout)", e.args[0], type(pipe).__name__)
        return None
    if state is None:
        log.info("no single-file checkpoint for %s (layouts: %s)", type(pipe).__name__, ", ".join(LAYOUTS))
        return None
    with atomic_file(path) as tmp:
        save_file({k: t.detach().float().cpu().contiguous() for k, t in state.items()}, tmp, metadata={"format": "pt", "written_by": "diffusion_lab"})
    return Path(path)
