"""One job = one process group: the Hydra x Lightning-DDP handshake of a (multirun) job, and the
DDP ranks it launches watched so that a failed rank fails its job, not the sweep."""

from __future__ import annotations

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
from omegaconf import DictConfig, open_dict, read_write

from diffusion_lab.utils.hydra_context import _FLAGS_WITH_VALUE, _hydra_cfg
from diffusion_lab.utils.results import finish_loggers

log = logging.getLogger(__name__)

# What Lightning's subprocess launcher writes into os.environ of the process that launches the
# others. Left behind after a job, ``LOCAL_RANK`` makes the next job of a multirun believe it was
# started by torchrun (so it never launches its children and waits for them forever).
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


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
        from diffusion_lab.compat.lightning import ddp_process_observer

        with ddp_process_observer(self.watch):
            yield self

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
