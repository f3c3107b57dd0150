"""Rebuild a trained module from a Lightning checkpoint written by ``diffusion_lab.train``."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.safe_load import check_config, load_checkpoint

# Modules that moved after checkpoints were written: a stored config naming the old path is read as
# naming the new one (#28: the tiny test/demo builders left ``components/`` for ``testing/``).
MOVED = {
    # the tiny MMDiT backbones (backbone=sd3_tiny|flux_tiny) left testing/tiny.py: before the prefixes below (first match wins)
    "diffusion_lab.components.tiny.tiny_sd3_transformer": "diffusion_lab.testing.tiny_mmdit.tiny_sd3_transformer",
    "diffusion_lab.components.tiny.tiny_flux_transformer": "diffusion_lab.testing.tiny_mmdit.tiny_flux_transformer",
    "diffusion_lab.testing.tiny.tiny_sd3_transformer": "diffusion_lab.testing.tiny_mmdit.tiny_sd3_transformer",
    "diffusion_lab.testing.tiny.tiny_flux_transformer": "diffusion_lab.testing.tiny_mmdit.tiny_flux_transformer",
    "diffusion_lab.components.tiny.": "diffusion_lab.testing.tiny.",
    "diffusion_lab.components.vocab.": "diffusion_lab.testing.vocab.",
    "diffusion_lab.data.sources.DigitsDataset": "diffusion_lab.data.digits.DigitsDataset",
    "diffusion_lab.data.sources.ImageFolderDataset": "diffusion_lab.data.image_folder.ImageFolderDataset",
    "diffusion_lab.data.sources.HFImageDataset": "diffusion_lab.data.hf.HFImageDataset",
}


def moved_paths(node):
    """``node`` (a plain container) with every string that starts with an old path in ``MOVED``
    renamed to the new one; a new container, ``node`` is left as it is."""
    if isinstance(node, dict):
        return {k: moved_paths(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(moved_paths(v) for v in node)
    if isinstance(node, str):
        for old, new in MOVED.items():
            if node.startswith(old):
                return new + node[len(old) :]
    return node


def load_module(ckpt_path: str, use_ema: bool = True, map_location: str = "cpu", trust: bool = False):
    """The ``DiffusionModule`` saved in ``ckpt_path``: built from the resolved config stored in the
    checkpoint, weights loaded, and (``use_ema``) the EMA weights copied into the UNet.

    The file is read as tensors and plain values only, and its config is built only when it names
    nothing but what ``conf/`` builds (``utils/safe_load.py``); ``trust`` (``trust_checkpoint=true``)
    skips both checks, for a checkpoint whose author you trust."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r} does not exist. Checkpoints are written to <run dir>/checkpoints/ (last.ckpt).")
    ckpt = load_checkpoint(path, map_location, trust)
    config = ckpt.get("diffusion_lab_config") if isinstance(ckpt, dict) else None
    if not isinstance(config, dict):
        raise ConfigError(f"{ckpt_path} has no 'diffusion_lab_config': it was not written by diffusion_lab.train. Use pipeline=<folder> instead.")
    config = moved_paths(config)
    if not trust:
        check_config(config.get("model"), ckpt_path)
    cfg = OmegaConf.create(config)
    module = instantiate(cfg.model)
    module.load_state_dict(ckpt["state_dict"])
    if use_ema:
        ema_state = ckpt.get("callbacks", {}).get("ema")
        if ema_state and ema_state.get("shadow_params"):
            from diffusion_lab.callbacks.ema import ema_parameters

            params = ema_parameters(module)  # the order EMACallback tracks them in
            if len(params) != len(ema_state["shadow_params"]):
                raise ConfigError(f"{ckpt_path}: its EMA holds {len(ema_state['shadow_params'])} tensors, the rebuilt model has {len(params)} trainable ones; load it with use_ema=false.")
            with torch.no_grad():
                for p, s in zip(params, ema_state["shadow_params"]):
                    p.copy_(s)
    module.run_config = config
    return module.eval()
