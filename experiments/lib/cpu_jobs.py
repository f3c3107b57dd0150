"""Training runs as child processes, ``parallel`` at a time on one thread each, with each child's
own CPU time (``os.wait4``'s rusage): what the experiment scripts compare when the machine is shared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def train_jobs(jobs: dict[str, list[str]], runs: Path, parallel: int = 1, quiet: bool = True, cwd: str | None = None) -> dict[str, dict]:
    """``python -m diffusion_lab.train <overrides> hydra.run.dir=<runs>/<name>`` for each job; returns
    and writes ``<runs>/<name>/train_cpu.json``: ``{"cpu_seconds", "wall_seconds"}`` (user + system
    time of the child and its children). Raises naming the log of a run that failed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending, running, done = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name = pending.pop(0)
            cmd = [sys.executable, "-m", "diffusion_lab.train", *jobs[name], f"hydra.run.dir={runs / name}"]
            print("$", " ".join(cmd[2:]), flush=True)
            out = subprocess.DEVNULL if quiet else None
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=out)
            running[proc.pid] = (name, time.perf_counter())
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        name, t0 = running.pop(pid)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{name}: training failed (exit {os.waitstatus_to_exitcode(status)}); see {runs / name}/train.log")
        info = {"cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "wall_seconds": round(time.perf_counter() - t0, 1)}
        (runs / name / "train_cpu.json").write_text(json.dumps(info))
        print(f"{name}: {info['cpu_seconds'] / 60:.1f} CPU min, {info['wall_seconds'] / 60:.1f} wall min", flush=True)
        done[name] = info
    return done
