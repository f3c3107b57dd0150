"""The experiment scripts as their READMEs run them: they import the library (never an entry
point), and by default write a new run folder, leaving the committed results alone."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_lab.train import train
from experiments.lib.outputs import run_dir

from tests.conftest import compose_cfg
from tests.multiproc import REPO, tiny

EXPERIMENTS = REPO / "experiments"
# script -> (its experiment name, the folder of its committed results)
SCRIPTS = {
    "ddpm_digits/score.py": ("ddpm_digits", "experiments/ddpm_digits"),
    "ldm_digits/score.py": ("ldm_digits", "experiments/ldm_digits/results/base"),
    "samplers/run.py": ("samplers", "experiments/samplers"),
    "sweep_digits/report.py": ("sweep_digits", "experiments/sweep_digits"),
    "bench/bench.py": ("bench", "experiments/bench/results"),
    "bench/sd15_flops.py": ("bench", "experiments/bench/results"),
}


def _load(script: str):
    spec = importlib.util.spec_from_file_location(f"experiment_{script.replace('/', '_')[:-3]}", EXPERIMENTS / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_imports_and_its_help_names_the_run_folder_and_the_refresh(script, monkeypatch, capsys):
    experiment, committed = SCRIPTS[script]
    module = _load(script)  # a stale import (diffusion_lab.sample, components.schedulers) fails here
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"outputs/experiments/{experiment}/<date>_<time>/" in help_text and f"--out {committed}" in help_text


def test_experiments_import_the_library_never_an_entry_point():
    entries = ("diffusion_lab.sample", "diffusion_lab.train", "diffusion_lab.evaluate", "diffusion_lab.noising")
    offenders = [
        f"{p.relative_to(REPO)}: {line.strip()}"
        for p in EXPERIMENTS.rglob("*.py")
        for line in p.read_text().splitlines()
        if line.strip().startswith(("from ", "import ")) and any(line.split()[1] == e or line.split()[1].startswith(e + ".") for e in entries)
    ]
    assert offenders == []


def test_run_dir_is_new_every_time_unless_out_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    first, second = run_dir(None, "ddpm_digits"), run_dir(None, "ddpm_digits")
    assert first != second and first.parent == second.parent == tmp_path / "outputs" / "experiments" / "ddpm_digits"
    assert first.is_dir() and second.is_dir()
    assert run_dir(tmp_path / "mine", "ddpm_digits") == tmp_path / "mine" and (tmp_path / "mine").is_dir()


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    """An exported DDPMPipeline of a 4-step tiny run."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    train(compose_cfg("train", tiny("callbacks.sample_grid=null", "callbacks.noising_strip=null"), run))
    return run / "pipeline"


def test_ddpm_score_writes_a_run_folder_and_leaves_the_committed_results_alone(tiny_pipeline, tmp_path):
    committed = EXPERIMENTS / "ddpm_digits"
    before, repo_outputs = _digests(committed), sorted((REPO / "outputs" / "experiments" / "ddpm_digits").glob("*"))
    env = {k: v for k, v in os.environ.items() if k != "PROJECT_ROOT"}
    cmd = [sys.executable, str(committed / "score.py"), "--pipeline", str(tiny_pipeline), "--num-images", "8", "--batch-size", "8", "--steps", "2", "--sampler", "dpmpp"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    runs = list((tmp_path / "outputs" / "experiments" / "ddpm_digits").iterdir())
    assert len(runs) == 1 and sorted(p.name for p in runs[0].iterdir()) == ["results.json", "results.md", "samples.png"]
    assert f"to {runs[0].relative_to(tmp_path)}" in proc.stdout  # it says where it wrote
    results = json.loads((runs[0] / "results.json").read_text())
    assert results["n"] == 8 and results["sampler"] == "dpmpp" and results["steps"] == 2
    assert _digests(committed) == before  # byte for byte
    assert sorted((REPO / "outputs" / "experiments" / "ddpm_digits").glob("*")) == repo_outputs  # nothing in the clone either

    out = tmp_path / "refresh"
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "samples.png"]  # --out: exactly there
    assert len(list((tmp_path / "outputs" / "experiments" / "ddpm_digits").iterdir())) == 1
