"""OmegaConf resolvers used by ``conf/`` (registered once on ``import diffusion_lab``)."""

from __future__ import annotations

import os

from omegaconf import OmegaConf


def _wandb_mode() -> str:
    """``offline`` unless the user has a W&B key (or forces a mode with ``WANDB_MODE``)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def register_resolvers() -> None:
    resolvers = {
        # integer division, e.g. latent size = ${div:${data.resolution},${vae.downsample_factor}}
        "div": lambda a, b: int(a) // int(b),
        "mul": lambda a, b: a * b,
        "wandb_mode": _wandb_mode,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
