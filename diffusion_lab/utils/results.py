"""What a finished run hands on: its resolved config (file and loggers), the metric a sweeper
ranks it by, and its W&B run closed."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.hydra_context import _hydra_cfg, _is_multirun

log = logging.getLogger(__name__)


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


def _sweeper_needs_metric(hc: DictConfig | None) -> bool:
    """A multirun whose sweeper ranks jobs by what ``train()`` returns (Optuna); Hydra's basic
    sweeper (``-m a=1,2``, ``sweep=...``) runs a grid and ignores it."""
    target = str(OmegaConf.select(hc, "sweeper._target_") or "") if hc is not None else ""
    return _is_multirun(hc) and not target.endswith("BasicSweeper")


def _why_not_logged(cfg: DictConfig, trainer, key: str) -> str:
    """The config key that kept ``key`` from being logged, when it is a validation metric."""
    if not key.startswith("val/"):
        return "Set optimized_metric to one of the logged metrics."
    every, steps = OmegaConf.select(cfg, "trainer.val_check_interval"), trainer.global_step
    if isinstance(every, int) and every > steps:
        return (
            f"Validation never ran: trainer.val_check_interval={every} is more than the {steps} steps trained "
            f"(trainer.max_steps); set trainer.val_check_interval={max(1, steps)} (or less)."
        )
    if not OmegaConf.select(cfg, "data.val_fraction") or not OmegaConf.select(cfg, "trainer.limit_val_batches"):
        return "Validation has no batches: set data.val_fraction > 0 and trainer.limit_val_batches > 0."
    return "Make sure validation runs (trainer.val_check_interval, trainer.limit_val_batches, data.val_fraction)."


def optimized_metric(cfg: DictConfig, trainer) -> float | None:
    """The value of ``cfg.optimized_metric`` after fit (what sweepers optimise); None if unset or
    not logged. Not logged is an error only for a sweeper that ranks jobs by it (Optuna); a grid
    warns, a single run only says so in the log."""
    key = cfg.get("optimized_metric")
    if not key:
        return None
    value = trainer.callback_metrics.get(key)
    if value is not None:
        return float(value)
    hc = _hydra_cfg()
    why = f"optimized_metric={key!r} was not logged by this run (logged: {sorted(trainer.callback_metrics)}). {_why_not_logged(cfg, trainer, key)}"
    if _sweeper_needs_metric(hc):  # the sweeper cannot rank this job
        raise ConfigError(why)
    if _is_multirun(hc):
        log.warning(f"{why} This job returns None.")
    else:
        log.info(f"{why} train() returns None.")
    return None
