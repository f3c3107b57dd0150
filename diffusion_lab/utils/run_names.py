"""W&B run names and groups of a (multi)run, from the overrides its sweep varies; the
``${run_name:...}`` and ``${sweep_group:...}`` resolvers of ``conf/logger/wandb.yaml``."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from diffusion_lab.utils.hydra_context import _cli_overrides, _hydra_cfg, _is_multirun


def _swept_keys(hc: DictConfig) -> list[str]:
    """Keys the sweep varies: ``hydra.sweeper.params`` plus command-line sweeps (``lr=1e-4,3e-4``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = list((OmegaConf.select(hc, "sweeper.params") or {}).keys())
    cli = [a for a in _cli_overrides(sys.argv[1:]) if "=" in a]
    try:
        keys += [o.get_key_element() for o in OverridesParser.create().parse_overrides(cli) if o.is_sweep_override()]
    except Exception:  # argv is not Hydra's (e.g. a submitit worker): fall back to sweeper params
        pass
    return list(dict.fromkeys(k.lstrip("+~") for k in keys))


def _short(key: str, keys: list[str]) -> str:
    """``scheduler.prediction_type`` -> ``prediction_type`` unless two swept keys end the same way."""
    tail = lambda k: k.replace("/", ".").split(".")[-1]  # noqa: E731
    return tail(key) if sum(tail(k) == tail(key) for k in keys) == 1 else key


def _short_value(value: str) -> str:
    """Sampled floats (Optuna) to 4 significant digits: ``0.0003574712922600243`` -> ``0.0003575``."""
    try:
        return f"{float(value):.4g}" if any(c in value for c in ".eE") else value
    except ValueError:
        return value


def run_name(default: str) -> str:
    """W&B run name. In a multirun: ``#<job> key=value ...`` over the swept overrides (all of the
    job's overrides when the sweep's keys cannot be told); otherwise ``default``."""
    hc = _hydra_cfg()
    if not _is_multirun(hc):
        return default
    overrides = [o for o in hc.overrides.task if "=" in o]
    swept = _swept_keys(hc)
    chosen = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept] or overrides
    keys = [o.split("=", 1)[0].lstrip("+~") for o in chosen]
    parts = [f"{_short(k, keys)}={_short_value(o.split('=', 1)[1])}" for k, o in zip(keys, chosen)]
    return " ".join([f"#{hc.job.num}", *parts])


def sweep_group(task_name: str) -> str | None:
    """W&B group shared by every run of one multirun: ``<task_name>-<sweep folder name>``
    (the folder is timestamped, so relaunching a sweep starts a new group). None for single runs."""
    hc = _hydra_cfg()
    if not _is_multirun(hc):
        return None
    return f"{task_name}-{Path(str(hc.sweep.dir)).name}"
