"""What Hydra says about the running job, for the other run modules: its Hydra config (None
outside ``@hydra.main``), whether it is a multirun job, and the overrides of a Hydra command line."""

from __future__ import annotations

from omegaconf import DictConfig

# Hydra flags whose value is the next argv token.
_FLAGS_WITH_VALUE = {"-cn", "-cp", "-cd", "--config-name", "--config-path", "--config-dir", "--experimental-rerun"}


def _hydra_cfg() -> DictConfig | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _is_multirun(hc: DictConfig | None) -> bool:
    from hydra.types import RunMode

    return hc is not None and hc.mode == RunMode.MULTIRUN


def _cli_overrides(argv: list[str]) -> list[str]:
    """The positional ``key=value`` tokens of a Hydra command line (flags and their values dropped)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.startswith("-"):
            skip = a in _FLAGS_WITH_VALUE
        else:
            out.append(a)
    return out
