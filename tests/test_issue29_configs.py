"""README commands of issue 29 as a new user types them: the experiments' own progress bar, paired
control images against computed ones, bucket sizes through a real shell, and the experiment
scripts' run folders. (Every experiment composed with the vae it names: tests/test_configs.py.)"""

from __future__ import annotations

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
