"""The console scripts of ``pyproject.toml`` (``dl-train``, ``dl-sample``, ...) for the Hydra entry points.

    dl-train experiment=ddpm_digits      # the same as: python -m diffusion_lab.train experiment=ddpm_digits

Each runs the entry's ``main`` inside ``explain_unknown_keys``, as ``python -m diffusion_lab.<name>``
does, so a misspelled key gets the same hint either way. The entry is imported when its script
runs (``dl-doctor`` does not pay for importing the training stack). The argparse entries
(``lora``, ``tiny_sd``, ``doctor``) need no wrapper: their scripts name their ``main`` directly.
"""

from __future__ import annotations

import importlib


def _run(name: str) -> None:
    """``python -m diffusion_lab.<name>``: its Hydra ``main`` with the unknown-key hints."""
    from diffusion_lab.utils.cli import explain_unknown_keys

    entry = importlib.import_module(f"diffusion_lab.{name}")
    with explain_unknown_keys(name):
        entry.main()


def train() -> None:
    _run("train")


def sample() -> None:
    _run("sample")


def evaluate() -> None:
    _run("evaluate")


def prepare() -> None:
    _run("prepare")


def plan() -> None:
    _run("plan")


def posthoc_ema() -> None:
    _run("posthoc_ema")


def noising() -> None:
    _run("noising")
