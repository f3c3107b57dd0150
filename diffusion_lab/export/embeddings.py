"""Textual inversion exports: the learned token embeddings in the formats their loaders read.

| file | format | loads with |
|---|---|---|
| ``learned_embeds.safetensors`` | diffusers: ``{placeholder: [num_vectors, D]}`` (``text_encoder``) | ``pipe.load_textual_inversion(dir)`` |
| ``learned_embeds_<k>.safetensors`` | the same for ``text_encoder_<k>`` (SDXL's, SD3's second CLIP; SD3's / FLUX.1's T5 with ``adapter.t5``) | ``pipe.load_textual_inversion(file, token=..., text_encoder=pipe.text_encoder_<k>, tokenizer=pipe.tokenizer_<k>)`` |
| ``<name>.safetensors`` | SD 1.x: A1111 / ComfyUI ``{"emb_params": [num_vectors, D]}``; SDXL / SD3 / FLUX.1: ComfyUI's per-encoder keys ``clip_l``, ``clip_g``, ``t5xxl`` | A1111 / ComfyUI ``embeddings/`` (prompt word = file name) |
| ``<name>.pt`` | SD 1.x: A1111 (pickle) ``{"string_to_param": {"*": [num_vectors, D]}, "name": ...}`` | A1111; diffusers: ``pipe.load_textual_inversion(file)`` |

``<name>`` is the placeholder without its angle brackets (``<thick>`` -> ``thick``). ``load_embeddings(pipe, dir)``
loads every ``learned_embeds*`` file into its encoder with diffusers' own ``TextualInversionLoaderMixin`` code, also for
``StableDiffusion3Pipeline``, which has no ``load_textual_inversion`` (nor expands a multi-vector placeholder in prompts:
write ``<tok> <tok>_1 ...`` yourself there).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffusion_lab.utils.io import atomic_dir

DIFFUSERS_FILE = "learned_embeds.safetensors"  # diffusers' TEXT_INVERSION_NAME_SAFE
# ComfyUI's embedding key of each text encoder (its tokenizers' ``embedding_key``), by the pipeline the run exports
COMFY_KEYS = {
    "StableDiffusionXLPipeline": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
    "StableDiffusion3Pipeline": {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"},
    "FluxPipeline": {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"},
}


def embedding_name(placeholder: str) -> str:
    """File stem of the A1111 / ComfyUI files (those tools take the prompt word from it)."""
    return placeholder.strip("<>") or "embedding"


def diffusers_file(component: str) -> str:
    """``text_encoder`` -> ``learned_embeds.safetensors``; ``text_encoder_<k>`` -> ``learned_embeds_<k>.safetensors``."""
    suffix = component.removeprefix("text_encoder")
    return DIFFUSERS_FILE.replace(".safetensors", f"{suffix}.safetensors")


def save_textual_inversion(module, out_dir: str | Path) -> None:
    """``module``'s learned embeddings (``adapter=textual_inversion``) into ``out_dir`` (atomically): one diffusers
    file per encoder that learned the token (``diffusers_file``), and the A1111 / ComfyUI file(s) of the table above."""
    embedding = module.text_embedding
    token, learned = embedding.placeholder_token, embedding.learned()  # component -> [num_vectors, D]
    name = embedding_name(token)
    keys = COMFY_KEYS.get(module.family.pipeline_class)
    with atomic_dir(out_dir) as tmp:
        for component, embeds in learned.items():
            save_file({token: embeds}, str(Path(tmp) / diffusers_file(component)))
        if keys is not None:
            save_file({keys[c]: e for c, e in learned.items()}, str(Path(tmp) / f"{name}.safetensors"))
            return
        embeds = next(iter(learned.values()))
        save_file({"emb_params": embeds}, str(Path(tmp) / f"{name}.safetensors"))
        a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": embeds}, "name": name, "step": int(module.global_step), "sd_checkpoint": None, "sd_checkpoint_name": None}
        torch.save(a1111, Path(tmp) / f"{name}.pt")


def load_embeddings(pipe, folder: str | Path) -> list[str]:
    """Every ``learned_embeds*.safetensors`` of ``folder`` into the encoder it was learned in (``text_encoder<suffix>``
    and ``tokenizer<suffix>`` of ``pipe``), by diffusers' ``TextualInversionLoaderMixin.load_textual_inversion`` (also
    for pipelines without that mixin, such as ``StableDiffusion3Pipeline``). Returns the components loaded."""
    from diffusers.loaders import TextualInversionLoaderMixin

    loader = pipe if isinstance(pipe, TextualInversionLoaderMixin) else _loader(pipe)
    loaded = []
    for path in sorted(Path(folder).glob("learned_embeds*.safetensors")):
        suffix = re.fullmatch(r"learned_embeds(_\d+)?\.safetensors", path.name).group(1) or ""
        (token,) = load_file(str(path))
        encoder, tokenizer = getattr(pipe, f"text_encoder{suffix}"), getattr(pipe, f"tokenizer{suffix}")
        loader.load_textual_inversion(str(path), token=token, text_encoder=encoder, tokenizer=tokenizer)
        loaded.append(f"text_encoder{suffix}")
    return loaded


def _loader(pipe):
    """diffusers' ``TextualInversionLoaderMixin`` over a pipeline that lacks it: its loader reads only the tokenizer and
    encoder it is given, the pipeline's components (for offload hooks) and ``hf_device_map``."""
    from diffusers.loaders import TextualInversionLoaderMixin

    shim = type("TextualInversionLoader", (TextualInversionLoaderMixin,), {})()
    shim.components, shim.hf_device_map = pipe.components, getattr(pipe, "hf_device_map", None)
    return shim


def is_textual_inversion(module) -> bool:
    """A textual inversion run (``adapter=textual_inversion``): exported as embedding files."""
    return getattr(module, "text_embedding", None) is not None
