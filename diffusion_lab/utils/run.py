"""Run plumbing shared by the entry points: config saving, run naming, logger finishing, the
Hydra x Lightning-DDP handshake, readable errors."""

from __future__ import annotations

import difflib
import logging
import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager, nullcontext
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


class RankFailed(RuntimeError):
    """A DDP rank that this process launched for the job exited with an error."""


class LaunchedRanks:
    """The ranks Lightning's DDP launcher starts for one job, watched in place of Lightning's
    child-process observer, which SIGKILLs the launching process as soon as one of them fails:
    in a multirun that process is the whole sweep. Here a failed rank takes down its job only:
    the job's other launched ranks are killed (they may wait forever in a collective), the
    launching rank fails at its next collective (gloo: at once, the peer is gone), and Hydra goes
    on with the next job. Only if this process is still inside the job ``stuck_after_s`` seconds
    later (a collective that never returns, e.g. NCCL without a timeout) is it killed, as
    Lightning would (``on_stuck``)."""

    def __init__(self, log_dir: str | None = None, stuck_after_s: float = 300.0, poll_s: float = 1.0, on_stuck=None) -> None:
        self.procs: list[subprocess.Popen] = []
        self.failed: tuple[int, int] | None = None  # (local rank, exit code) of the first that failed
        self.log_dir, self.stuck_after_s, self.poll_s = log_dir, stuck_after_s, poll_s
        self.on_stuck = on_stuck or (lambda: os.kill(os.getpid(), signal.SIGKILL))
        self._job_over = threading.Event()

    @contextmanager
    def replacing_lightning_observer(self) -> Iterator["LaunchedRanks"]:
        """While the job runs, Lightning's launcher starts ``watch`` instead of its own observer."""
        from pytorch_lightning.strategies.launchers import subprocess_script

        original = subprocess_script._launch_process_observer
        subprocess_script._launch_process_observer = self.watch
        try:
            yield self
        finally:
            subprocess_script._launch_process_observer = original

    def watch(self, procs: list[subprocess.Popen]) -> None:
        """Watch ``procs`` (local ranks 1, 2, ...) from a daemon thread until the job is over."""
        self.procs = procs
        threading.Thread(target=self._watch, name="ddp-rank-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self._job_over.wait(self.poll_s):
            codes = [p.poll() for p in self.procs]
            if all(c == 0 for c in codes):
                return
            if any(codes):
                self._record_failure()
                log.error(f"{self.describe()}: stopping the job's other ranks.")
                self._kill()
                if not self._job_over.wait(self.stuck_after_s):
                    log.error(f"still inside the job {self.stuck_after_s:.0f} s after {self.describe()}: stuck in a collective; killing this process.")
                    self.on_stuck()
                return

    def _record_failure(self) -> bool:
        """Note the first failed rank; True when this call found it."""
        if self.failed is None:
            self.failed = next(((i + 1, p.returncode) for i, p in enumerate(self.procs) if p.returncode), None)
            return self.failed is not None
        return False

    def _kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()

    def describe(self) -> str:
        rank, code = self.failed
        where = f" (its log: {Path(self.log_dir) / f'train_ddp_process_{rank}.log'})" if self.log_dir else ""
        return f"DDP rank {rank} of this job exited with code {code}{where}"

    def end_job(self, ok: bool, timeout_s: float = 60.0) -> None:
        """After the job: give the launched ranks ``timeout_s`` to exit, kill what is left, and
        raise ``RankFailed`` when the job, ``ok`` in this rank, failed in another."""
        self._job_over.set()
        for p in self.procs:
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self._record_failure() and not ok:
            log.error(self.describe())
        if ok and self.failed is not None:
            raise RankFailed(self.describe())


@contextmanager
def job_scope(trainer, loggers: list) -> Iterator[None]:
    """Around ``trainer.fit`` of one (possibly multirun) job:

    * Lightning's ``ddp`` launcher re-runs ``sys.argv`` for ranks > 0 with ``hydra.run.dir`` set.
      In a multirun that argv is the whole sweep (``-m lr=1e-4,3e-4``) and ``run.dir`` is not the
      job's folder: every rank would start its own sweep in a new folder. Here the children get
      this job's overrides and folder instead.
    * A launched rank that crashes fails this job only, not the process running the sweep
      (``LaunchedRanks``); the job's ranks have all exited before the next job starts.
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
    ranks = LaunchedRanks(hc.runtime.output_dir if hc is not None else None) if launches_children else None
    failed = True
    try:
        with ranks.replacing_lightning_observer() if ranks else nullcontext():
            yield
        failed = False
    finally:
        sys.argv = argv_before
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # also ends a launched rank's wait for this one
        try:
            if ranks is not None:
                ranks.end_job(ok=not failed)  # RankFailed: this rank finished, another did not
        except RankFailed:
            failed = True
            raise
        finally:
            finish_loggers(loggers, failed=failed)
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


# ---- misspelled config keys ----------------------------------------------------------------
def _leaf_paths(tree: dict, prefix: str = "") -> list[str]:
    """Every key of a nested dict as a dotted path, sections and values alike."""
    out = []
    for k, v in tree.items():
        out.append(prefix + str(k))
        if isinstance(v, dict):
            out += _leaf_paths(v, prefix + str(k) + ".")
    return out


def _closest(parts: list[str], depth: int, names: list[str], paths: list[str]) -> list[str]:
    """Keys the user probably meant: close names in the deepest section that exists, or else keys
    anywhere whose last name is close to the typed last name (``max_stepz`` -> ``trainer.max_steps``)."""
    prefix = ".".join(parts[:depth] + [""])
    here = [prefix + c for c in difflib.get_close_matches(parts[depth], names, n=3, cutoff=0.6)]
    if here:
        return here
    tails: dict[str, list[str]] = {}
    for p in paths:
        tails.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    return [p for name in difflib.get_close_matches(parts[-1], list(tails), n=3, cutoff=0.75) for p in tails[name]][:3]


def unknown_key_hints(overrides: list[str], config_name: str) -> list[str]:
    """For each ``a.b.c=value`` (or top-level ``key=value``) override whose key is not in the config
    (with the command line's group choices applied): the deepest section that exists, the closest
    keys there and anywhere in the config, and the section's keys."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from diffusion_lab.utils.config_path import conf_dir

    conf = conf_dir()
    plain = [o for o in overrides if "=" in o and not o.startswith(("+", "~", "hydra."))]
    groups = [o for o in plain if (conf / o.split("=", 1)[0]).is_dir()]  # data=hf, model/unet=tiny
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=groups)
    except Exception:  # the group choices themselves fail (or are a sweep): Hydra's message says why
        return []
    tree = OmegaConf.to_container(cfg, resolve=False)  # keys only: ${hydra:...} cannot resolve here
    paths = _leaf_paths(tree)
    hints = []
    for o in plain:
        key = o.split("=", 1)[0]
        if o in groups:
            continue
        parts, node, depth = key.split("."), tree, 0
        while depth < len(parts) and isinstance(node, dict) and parts[depth] in node:
            node, depth = node[parts[depth]], depth + 1
        if depth == len(parts):  # a key that exists
            continue
        section = ".".join(parts[:depth]) or "the top level"
        if not isinstance(node, dict):
            hints.append(f"{key}: {section} is a value, not a section.")
            continue
        names = [str(k) for k in node]
        close = _closest(parts, depth, names, paths)
        guess = f" Did you mean {' or '.join(close)}?" if close else ""
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
