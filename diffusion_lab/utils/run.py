"""Run plumbing shared by the entry points: config saving, logger finishing, readable errors."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from diffusion_lab.utils.errors import DiffusionLabError


@rank_zero_only
def save_config(cfg: DictConfig, trainer=None) -> None:
    """Write the resolved config to ``<output_dir>/config.yaml`` and into every logger."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if trainer is not None:
        container = OmegaConf.to_container(cfg, resolve=True)
        for logger in trainer.loggers:
            logger.log_hyperparams(container)


def finish_loggers(loggers: list, failed: bool = False) -> None:
    """Always close W&B runs, also after a failure, so the next run of a multirun starts clean."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=1 if failed else 0)


@contextmanager
def friendly_errors():
    """Turn our user-facing errors into one readable paragraph instead of a traceback."""
    try:
        yield
    except DiffusionLabError as e:
        print(f"\nerror: {e}\n", file=sys.stderr)
        raise SystemExit(2) from None
