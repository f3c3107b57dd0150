"""Build callbacks and loggers from their config groups (each a dict of named ``_target_`` nodes)."""

from __future__ import annotations

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from diffusion_lab.utils.errors import ConfigError


def _instantiate_group(cfg: DictConfig | None, key: str) -> list:
    if not cfg:
        return []
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{key} must be a mapping of name -> {{_target_: ...}}; got {type(cfg).__name__}")
    out = []
    for name, node in cfg.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            out.append(instantiate(node))
        elif node is not None:
            raise ConfigError(f"{key}.{name} has no _target_; every entry of {key} must name a class with _target_ (or be null to switch it off).")
    return out


def instantiate_callbacks(cfg: DictConfig | None) -> list[pl.Callback]:
    return _instantiate_group(cfg, "callbacks")


def instantiate_loggers(cfg: DictConfig | None) -> list:
    return _instantiate_group(cfg, "logger")
