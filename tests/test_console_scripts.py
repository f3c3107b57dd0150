"""#28: console scripts (``dl-train``, ``dl-sample``, ...) in ``pyproject.toml``, one per entry point,
keeping ``python -m diffusion_lab.<name>``."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def target(spec: str):
    """``module:attr.attr`` (an entry point's object reference) -> the object."""
    module, _, attrs = spec.partition(":")
    obj = importlib.import_module(module)
    for attr in attrs.split("."):
        obj = getattr(obj, attr)
    return obj


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_script_target_imports_and_is_callable(name):
    assert callable(target(SCRIPTS[name])), SCRIPTS[name]


def test_every_entry_point_has_a_script():
    """Each ``diffusion_lab/<name>.py`` that runs as ``python -m`` has ``dl-<name>`` (``_`` -> ``-``)
    naming ``main`` or its ``scripts.py`` wrapper."""
    entries = sorted(p.stem for p in (ROOT / "diffusion_lab").glob("*.py") if re.search(r"^if __name__ == .__main__.:", p.read_text(), re.M))
    assert {"train", "sample", "evaluate", "tiny_sd"} <= set(entries)
    for name in entries:
        script = "dl-" + name.replace("_", "-")
        assert script in SCRIPTS, f"python -m diffusion_lab.{name} has no console script {script} in pyproject.toml"
        assert SCRIPTS[script] in (f"diffusion_lab.{name}:main", f"diffusion_lab.scripts:{name}"), SCRIPTS[script]


def test_a_hydra_script_starts_and_keeps_the_unknown_key_hint(tmp_path):
    """``dl-train`` as pip's launcher runs it (``sys.exit(<target>())``): ``--help`` lists the groups, and a
    misspelled key gets the closest keys, as with ``python -m diffusion_lab.train``."""
    module, _, attr = SCRIPTS["dl-train"].partition(":")
    launcher = [sys.executable, "-c", f"import sys; from {module} import {attr}; sys.argv[0] = 'dl-train'; sys.exit({attr}())"]
    run = lambda *args: subprocess.run([*launcher, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)  # noqa: E731
    helped = run("--help")
    assert helped.returncode == 0 and "== Configuration groups ==" in helped.stdout and "experiment:" in helped.stdout, helped.stderr[-2000:]
    typo = run("trainer.max_step=3", f"hydra.run.dir={tmp_path / 'h'}")
    assert typo.returncode == 1 and "Did you mean trainer.max_steps" in typo.stderr, typo.stderr[-2000:]
