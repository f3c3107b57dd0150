"""Where an experiment script writes: a new run folder unless it is told to refresh the results.

``experiments/<name>/`` holds the committed results (tables, plots, JSON) that the READMEs quote.
A script run as documented writes a fresh ``outputs/experiments/<name>/<date>_<time>/`` with the
same files (under ``$PROJECT_ROOT``, else the current folder, like training runs), so trying a
command never changes them; ``--out experiments/<name>`` rewrites them, on purpose.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"  # Hydra's run folders use the same


def add_out_argument(parser: argparse.ArgumentParser, experiment: str, committed: str) -> None:
    """``--out DIR``; ``committed`` is the folder of the committed results (to name in the help)."""
    parser.add_argument(
        "--out",
        default=None,
        help=f"folder to write to (default: a new outputs/experiments/{experiment}/<date>_<time>/); "
        f"--out {committed} refreshes the committed results",
    )


def run_dir(out: str | os.PathLike | None, experiment: str) -> Path:
    """``out`` (created) when given, else a new ``outputs/experiments/<experiment>/<date>_<time>/``
    (``_1``, ``_2`` ... when that folder exists already)."""
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        return path
    parent = Path(os.environ.get("PROJECT_ROOT", ".")) / "outputs" / "experiments" / experiment
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime(TIME_FORMAT)
    for i in range(1000):
        path = parent / (stamp if i == 0 else f"{stamp}_{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free run folder for {stamp} under {parent}")
