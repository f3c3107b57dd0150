"""README commands of issue 29 as a new user types them: the experiments' own progress bar, paired
control images against computed ones, bucket sizes through a real shell, and the experiment
scripts' run folders. (Every experiment composed with the vae it names: tests/test_configs.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from PIL import Image

from diffusion_lab.callbacks.monitors import StepProgressBar
from tests.conftest import CONF_DIR
from tests.test_controlnet import diffusers_folder  # noqa: F401 (a fixture: the tiny SD pipeline folder)

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "docs" / "guides" / "data.md").read_text()  # the paired-images and bucket-size text moved there from README.md (#28)
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


# ---- item 2: README's paired-images command trains on the files it names

def _readme_command(after: str) -> list[str]:
    """The overrides of the first ``python -m diffusion_lab.train`` command in README after ``after``."""
    import shlex

    block = README.split(after, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    line = block.replace("\\\n", " ").strip().splitlines()[0]
    words = shlex.split(line, comments=True)
    assert words[:3] == ["python", "-m", "diffusion_lab.train"], line
    return words[3:]


def _fit_readme_paired(tmp_path, folder, *extra):
    from diffusion_lab.train import train
    from tests.conftest import compose_cfg
    from tests.test_controlnet import FAST, _paired_folder

    _paired_folder(tmp_path / "pairs")
    readme = [w if not w.startswith("data.root=") else f"data.root={tmp_path / 'pairs'}" for w in _readme_command("**Paired images**")]
    assert any(w.startswith("data.paired_images=") for w in readme)
    shrink = [*FAST, f"model.pretrained={folder}", "data.resolution=32", "data.num_workers=0", "data.val_fraction=0",
              "trainer.max_steps=1", "callbacks.sample_grid=null"]
    cfg = compose_cfg("train", [*shrink, *readme, *extra], tmp_path / "run")
    return train(cfg)[1]


def test_readme_paired_images_command_trains_on_the_paired_files(diffusers_folder, tmp_path):
    from diffusion_lab.data.control import CONTROL_KEY, ControlMaps

    objects = _fit_readme_paired(tmp_path, diffusers_folder)
    dm = objects["datamodule"]
    assert objects["trainer"].global_step == 1 and not isinstance(dm.train_set, ControlMaps)
    item = dm.train_set[0]  # the file of the conditioning_image column, not a map computed from the image
    control = Image.open(tmp_path / "pairs" / "control" / dm.dataset.files[0].name).convert("RGB")
    expected = torch.from_numpy(np.asarray(control, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(item[CONTROL_KEY], expected, atol=1 / 127.5, rtol=0)


def test_computed_and_paired_controls_together_are_refused_naming_both(diffusers_folder, tmp_path):
    from diffusion_lab.utils.errors import ConfigError
    from tests.test_latent import user_error

    with pytest.raises(Exception) as e:
        _fit_readme_paired(tmp_path, diffusers_folder, "data.control=edges")
    error = user_error(e)
    assert isinstance(error, ConfigError) and "\n" not in str(error)
    assert all(k in str(error) for k in ("data.control=edges", "data.paired_images", "conditioning_image", "data.control=null"))
    assert not (tmp_path / "run" / "controlnet").exists()  # refused before training


# ---- item 3: README's bucket_sizes spellings, typed into a real shell

def test_readme_bucket_sizes_survive_a_real_shell(tmp_path):
    import yaml

    from diffusion_lab.data.buckets import AspectBuckets

    spellings = re.findall(r"`([^`]*data\.bucket_sizes=[^`]*)`", README)
    assert spellings, "README shows no data.bucket_sizes= example"
    for spelling in spellings:
        line = (f"{sys.executable} -m diffusion_lab.train data=image_folder data.root={tmp_path} data.resolution=512 "
                f"data.buckets=true {spelling} --cfg job --package data")
        done = subprocess.run(["bash", "-c", line], cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, f"README's {spelling} in bash: {done.stderr[-500:]}"
        sizes = yaml.safe_load(done.stdout)["bucket_sizes"]
        assert AspectBuckets(512, 64, sizes).sizes == [(512, 512), (448, 576)], spelling
