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
    """``module``'s (a ``TextualInversion``) learned embeddings into ``out_dir`` (atomically)."""
    token = module.hparams.placeholder_token
    embeds = module.learned_embeddings()  # [num_vectors, D]
    name = embedding_name(token)
    with atomic_dir(out_dir) as tmp:
        save_file({token: embeds}, str(Path(tmp) / DIFFUSERS_FILE))
        save_file({"emb_params": embeds}, str(Path(tmp) / f"{name}.safetensors"))
        a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": embeds}, "name": name, "step": int(module.global_step), "sd_checkpoint": None, "sd_checkpoint_name": None}
        torch.save(a1111, Path(tmp) / f"{name}.pt")


def is_textual_inversion(module) -> bool:
    """A textual inversion run (``modules/textual_inversion.py``): exported as embedding files."""
    from diffusion_lab.modules.textual_inversion import TextualInversion

    return isinstance(module, TextualInversion)
