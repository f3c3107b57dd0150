"""Run plumbing shared by the entry points: config saving, run naming, logger finishing, the
Hydra x Lightning-DDP handshake, readable errors."""

from __future__ import annotations

import difflib
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from pytorch_lightning.utilities import rank_zero_only

from diffusion_lab.utils.errors import ConfigError, DiffusionLabError

log = logging.getLogger(__name__)

# What Lightning's subprocess launcher writes into os.environ of the process that launches the
# others. Left behind after a job, ``LOCAL_RANK`` makes the next job of a multirun believe it was
# started by torchrun (so it never launches its children and waits for them forever).
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Hydra flags whose value is the next argv token.
_FLAGS_WITH_VALUE = {"-cn", "-cp", "-cd", "--config-name", "--config-path", "--config-dir", "--experimental-rerun"}


def _hydra_cfg() -> DictConfig | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _is_multirun(hc: DictConfig | None) -> bool:
    from hydra.types import RunMode

    return hc is not None and hc.mode == RunMode.MULTIRUN


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


# ---- names ----------------------------------------------------------------------------------
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


# ---- one job = one process group ----------------------------------------------------------
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


def _child_argv(argv: list[str], hc: DictConfig) -> list[str]:
    """The command line Lightning's DDP launcher should give the other ranks of *this* job: the
    config-selecting flags, this job's own overrides (not the sweep), and ``hydra.mode=RUN``."""
    flags, skip = [], False
    for a in argv[1:]:
        if skip:
            flags.append(a)
            skip = False
        elif a.startswith("-") and a not in ("-m", "--multirun"):
            flags.append(a)
            skip = a in _FLAGS_WITH_VALUE
    return [argv[0], *flags, *hc.overrides.task, "hydra.mode=RUN"]


@contextmanager
def job_scope(trainer, loggers: list) -> Iterator[None]:
    """Around ``trainer.fit`` of one (possibly multirun) job:

    * Lightning's ``ddp`` launcher re-runs ``sys.argv`` for ranks > 0 with ``hydra.run.dir`` set.
      In a multirun that argv is the whole sweep (``-m lr=1e-4,3e-4``) and ``run.dir`` is not the
      job's folder: every rank would start its own sweep in a new folder. Here the children get
      this job's overrides and folder instead.
    * Afterwards the process group is destroyed and the launcher's env vars removed, so the next
      job of the sweep builds its own group on a fresh port.
    * Loggers (W&B) are always finished, with exit code 1 when the job failed, so one bad run
      does not break the runs after it.
    """
    hc = _hydra_cfg()
    env_before = {k: os.environ.get(k) for k in _LAUNCHER_ENV}
    argv_before = list(sys.argv)
    launches_children = trainer.world_size > 1 and not trainer.strategy.cluster_environment.creates_processes_externally
    if hc is not None and launches_children:
        from hydra.core.hydra_config import HydraConfig

        sys.argv = _child_argv(sys.argv, hc)
        run_node = HydraConfig.instance().cfg.hydra.run
        with read_write(run_node), open_dict(run_node):
            run_node.dir = hc.runtime.output_dir  # what Lightning passes on as hydra.run.dir
    try:
        yield
    except BaseException:
        finish_loggers(loggers, failed=True)
        raise
    else:
        finish_loggers(loggers)
    finally:
        sys.argv = argv_before
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        if launches_children:
            for k, v in env_before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def finish_loggers(loggers: list, failed: bool = False) -> None:
    """Always close W&B runs, also after a failure, so the next run of a multirun starts clean."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=1 if failed else 0)


def optimized_metric(cfg: DictConfig, trainer) -> float | None:
    """The value of ``cfg.optimized_metric`` after fit (what sweepers optimise); None if unset or
    not logged, which is an error in a multirun."""
    key = cfg.get("optimized_metric")
    if not key:
        return None
    value = trainer.callback_metrics.get(key)
    if value is None and not _is_multirun(_hydra_cfg()):
        log.warning(f"optimized_metric={key!r} was not logged by this run; returning None")
        return None
    if value is None:  # a sweeper cannot rank this job
        raise ConfigError(
            f"optimized_metric={key!r} was not logged by this run (logged: {sorted(trainer.callback_metrics)}). "
            "Set optimized_metric to one of those, or make sure validation runs (data.val_fraction > 0)."
        )
    return float(value)


# ---- misspelled config keys ----------------------------------------------------------------
_CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def unknown_key_hints(overrides: list[str], config_name: str) -> list[str]:
    """For each ``a.b.c=value`` override whose key is not in the config (with the command line's
    group choices applied): the deepest section that exists, the closest keys there, and its keys."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    plain = [o for o in overrides if "=" in o and not o.startswith(("+", "~", "hydra."))]
    groups = [o for o in plain if "." not in o.split("=", 1)[0]]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(_CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=groups)
    except Exception:  # the group choices themselves fail (or are a sweep): Hydra's message says why
        return []
    tree = OmegaConf.to_container(cfg, resolve=False)  # keys only: ${hydra:...} cannot resolve here
    hints = []
    for o in plain:
        key = o.split("=", 1)[0]
        parts, node, depth = key.split("."), tree, 0
        while depth < len(parts) and isinstance(node, dict) and parts[depth] in node:
            node, depth = node[parts[depth]], depth + 1
        if len(parts) == 1 or depth == len(parts):  # a group choice, or a key that exists
            continue
        section = ".".join(parts[:depth]) or "the top level"
        if not isinstance(node, dict):
            hints.append(f"{key}: {section} is a value, not a section.")
            continue
        names = [str(k) for k in node]
        close = difflib.get_close_matches(parts[depth], names, n=3, cutoff=0.6)
        prefix = ".".join(parts[:depth] + [""])
        guess = f" Did you mean {' or '.join(prefix + c for c in close)}?" if close else ""
        hints.append(f"{key} is not a config key ({parts[depth]!r} is not in {section}).{guess} Keys in {section}: {', '.join(names)}.")
    return hints


@contextmanager
def explain_unknown_keys(config_name: str):
    """Around a ``@hydra.main`` entry point: when Hydra refuses the command line, add which
    override keys do not exist and the closest existing ones (a typo, not a missing ``+``)."""
    try:
        yield
    except SystemExit as e:
        if e.code == 1:
            hints = unknown_key_hints(_cli_overrides(sys.argv[1:]), config_name)
            if hints:
                print("\nerror: " + " ".join(hints) + " (Prefix a new key with + only to add a key on purpose.)\n", file=sys.stderr)
        raise


@contextmanager
def friendly_errors():
    """Turn our user-facing errors into one readable paragraph instead of a traceback. In a
    multirun the error is logged and re-raised, so Hydra marks that job failed and goes on."""
    try:
        yield
    except Exception as raised:
        e = raised  # hydra.utils.instantiate wraps what a constructor raises: find ours
        while e is not None and not isinstance(e, DiffusionLabError):
            e = e.__cause__
        if e is None:
            raise
        if _is_multirun(_hydra_cfg()):
            log.error(f"job failed: {e}")
            raise
        print(f"\nerror: {e}\n", file=sys.stderr)
        raise SystemExit(2) from None
