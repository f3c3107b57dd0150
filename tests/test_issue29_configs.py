"""README commands of issue 29 as a new user types them: the experiments' own progress bar, paired
control images against computed ones, bucket sizes through a real shell, and the experiment
scripts' run folders. (Every experiment composed with the vae it names: tests/test_configs.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from diffusion_lab.callbacks.monitors import StepProgressBar
from tests.conftest import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


# ---- item 13: every experiment counts its bar in steps ("step k/N"), never "Epoch 76/-2"

@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_keeps_the_step_progress_bar(experiment):
    bar = _compose(f"experiment={experiment}").callbacks.get("progress_bar")
    assert bar is not None, f"experiment={experiment} sets callbacks.progress_bar: null (Lightning's 'Epoch 76/-2' bar)"
    assert isinstance(instantiate(bar), StepProgressBar)


# ---- item 12: the ladder / processes / backbones scripts write a new dated run folder

SCRIPTS = ("ladder", "processes", "backbones")


@pytest.mark.parametrize("name", SCRIPTS)
def test_study_script_defaults_to_a_new_dated_run_folder(name, monkeypatch, capsys):
    from tests.test_experiment_scripts import _load

    module = _load(f"{name}/run.py")
    monkeypatch.setattr(sys, "argv", [f"{name}/run.py", "--help"])
    with pytest.raises(SystemExit):
        module.main()
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"outputs/experiments/{name}/<date>_<time>/" in help_text and f"--out experiments/{name}" in help_text
    source = (REPO / "experiments" / name / "run.py").read_text()
    assert f'run_dir(args.out, "{name}")' in source and "Path(args.out)" not in source


def test_backbones_speed_writes_a_new_folder_each_time_and_out_still_rewrites(tmp_path):
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "experiments" / "backbones" / "run.py"), "speed", "--speed-steps", "1"]
    for _ in range(2):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)
    runs = sorted((tmp_path / "outputs" / "experiments" / "backbones").iterdir())
    assert len(runs) == 2 and all((r / "speed.json").is_file() for r in runs)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d(_\d+)?", runs[0].name)
    subprocess.run([*cmd, "--out", str(tmp_path / "committed")], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)
    assert (tmp_path / "committed" / "speed.json").is_file()
