"""Textual inversion exports: the learned token embeddings in the formats their loaders read.

| file | format | loads with |
|---|---|---|
| ``learned_embeds.safetensors`` | diffusers: ``{placeholder: [num_vectors, D]}`` | ``pipe.load_textual_inversion(dir)`` |
| ``<name>.safetensors`` | A1111 / ComfyUI: ``{"emb_params": [num_vectors, D]}`` | A1111 / ComfyUI ``embeddings/`` (prompt word = file name); diffusers: ``pipe.load_textual_inversion(file, token=...)`` |
| ``<name>.pt`` | A1111 (pickle): ``{"string_to_param": {"*": [num_vectors, D]}, "name": ...}`` | A1111; diffusers: ``pipe.load_textual_inversion(file)`` |

``<name>`` is the placeholder without its angle brackets (``<thick>`` -> ``thick``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from diffusion_lab.utils.io import atomic_dir

DIFFUSERS_FILE = "learned_embeds.safetensors"  # diffusers' TEXT_INVERSION_NAME_SAFE


def embedding_name(placeholder: str) -> str:
    """File stem of the A1111 / ComfyUI files (those tools take the prompt word from it)."""
    return placeholder.strip("<>") or "embedding"


def save_textual_inversion(module, out_dir: str | Path) -> None:
    """``module``'s learned embeddings (``adapter=textual_inversion``) into ``out_dir`` (atomically). One
    encoder (SD 1.x): the three files above. Two (SDXL, as diffusers' ``textual_inversion_sdxl.py``):
    ``learned_embeds.safetensors`` / ``learned_embeds_2.safetensors`` for ``text_encoder`` / ``text_encoder_2``
    (``pipe.load_textual_inversion(file, token=..., text_encoder=..., tokenizer=...)`` each) and the A1111 /
    ComfyUI SDXL embedding ``<name>.safetensors`` with ``clip_l`` and ``clip_g``."""
    embedding = module.text_embedding
    token, learned = embedding.placeholder_token, embedding.learned()  # component -> [num_vectors, D]
    name = embedding_name(token)
    with atomic_dir(out_dir) as tmp:
        if len(learned) == 1:
            embeds = next(iter(learned.values()))
            save_file({token: embeds}, str(Path(tmp) / DIFFUSERS_FILE))
            save_file({"emb_params": embeds}, str(Path(tmp) / f"{name}.safetensors"))
            a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": embeds}, "name": name, "step": int(module.global_step), "sd_checkpoint": None, "sd_checkpoint_name": None}
            torch.save(a1111, Path(tmp) / f"{name}.pt")
            return
        for k, embeds in enumerate(learned.values()):
            save_file({token: embeds}, str(Path(tmp) / (DIFFUSERS_FILE if k == 0 else DIFFUSERS_FILE.replace(".safetensors", f"_{k + 1}.safetensors"))))
        save_file(dict(zip(("clip_l", "clip_g"), learned.values())), str(Path(tmp) / f"{name}.safetensors"))


def is_textual_inversion(module) -> bool:
    """A textual inversion run (``adapter=textual_inversion``): exported as embedding files."""
    return getattr(module, "text_embedding", None) is not None
