"""The built wheel carries ``conf/``: installed with ``pip install .`` (not editable), the entry
points compose their configs and train from any folder, and ``--config-dir`` adds a user's own
experiments, both from the installed wheel and from the checkout.

The wheel is built from a copy of the sources in tmp_path (an in-tree build would write
``build/`` into the checkout, and a stale ``build/lib`` can leak deleted files into the wheel),
without build isolation or dependencies: no network."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONF_DIR, TINY

REPO = Path(__file__).resolve().parents[1]
CONF = Path(CONF_DIR)
YAMLS = sorted(p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml"))


def _env(pythonpath: Path) -> dict:
    """Offline, one thread, and ``diffusion_lab`` importable only from ``pythonpath``."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.update(PYTHONPATH=str(pythonpath), PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    env.pop("PROJECT_ROOT", None)  # paths.root_dir: the current folder
    return env


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _cfg_all(stdout: str) -> dict:
    """``--cfg all`` output -> dict (job keys at the top, Hydra's under ``hydra``)."""
    cfg = yaml.safe_load(stdout)
    assert isinstance(cfg, dict) and "hydra" in cfg, f"not a composed config:\n{stdout[-3000:]}"
    return cfg


def _main_config_dir(cfg: dict) -> Path:
    sources = {s["provider"]: s for s in cfg["hydra"]["runtime"]["config_sources"]}
    assert sources["main"]["schema"] == "file", sources
    return Path(sources["main"]["path"])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel --no-deps --no-build-isolation`` of a copy of the project."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in ["pyproject.toml", "setup.py", "README.md"]:
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ["diffusion_lab", "conf"]:
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    out = base / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(src)],
        cwd=base,
        env=_env(base),
    )
    wheels = list(out.glob("diffusion_lab-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel installed (not editable) with ``pip install --no-deps --target``."""
    target = tmp_path_factory.mktemp("site")
    _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        cwd=target.parent,
        env=_env(target.parent),
    )
    return target


@pytest.mark.slow  # minutes of multi-process or wheel work: make test-slow
def test_wheel_carries_every_config_and_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert len(YAMLS) > 50  # conf/ was found
    missing = [y for y in YAMLS if f"diffusion_lab/conf/{y}" not in names]
    assert not missing, f"conf files missing from the wheel (pyproject.toml package-data): {missing}"
    assert not [n for n in names if n.startswith("conf/")], "conf/ must be inside the package, not top level"
    # setup.py lists the packages: every subpackage (a folder with __init__.py) is shipped
    modules = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "diffusion_lab").rglob("*.py") if "__pycache__" not in p.parts)
    missing = [m for m in modules if m not in names]
    assert not missing, f"modules missing from the wheel (a folder without __init__.py? see setup.py): {missing}"


@pytest.mark.slow  # minutes of multi-process or wheel work: make test-slow
def test_installed_wheel_composes_train_config_from_any_folder(site, tmp_path):
    env = _env(site)
    probe = "import diffusion_lab, diffusion_lab.utils.config_path as c; print(diffusion_lab.__file__); print(c.CONFIG_PATH)"
    module_file, config_path = _run([sys.executable, "-c", probe], cwd=tmp_path, env=env).stdout.split()
    assert Path(module_file) == site / "diffusion_lab" / "__init__.py"
    assert Path(config_path) == site / "diffusion_lab" / "conf"

    proc = _run([sys.executable, "-m", "diffusion_lab.train", "--cfg", "all"], cwd=tmp_path, env=env)
    cfg = _cfg_all(proc.stdout)
    assert cfg["task_name"] == "train"
    assert cfg["model"]["_target_"].startswith("diffusion_lab.")  # conf/model/<default>.yaml
    assert list(cfg["logger"]) == ["wandb"]  # conf/logger/wandb.yaml, the default
    assert _main_config_dir(cfg) == site / "diffusion_lab" / "conf"  # configs from the wheel, not the repo
    assert Path(cfg["hydra"]["runtime"]["cwd"]) == tmp_path


@pytest.mark.slow  # minutes of multi-process or wheel work: make test-slow
def test_installed_wheel_other_entry_points_compose(site, tmp_path):
    """sample / evaluate / noising: each ``@hydra.main`` finds its primary config in the wheel."""
    script = (
        "import importlib, sys\n"
        "for name in ['sample', 'evaluate', 'noising']:\n"
        "    mod = importlib.import_module('diffusion_lab.' + name)\n"
        "    print('### ' + name + ' ' + mod.__file__, flush=True)\n"
        "    sys.argv = [name, '--cfg', 'job']\n"
        "    mod.main()\n"
    )
    out = _run([sys.executable, "-c", script], cwd=tmp_path, env=_env(site)).stdout
    parts = out.split("### ")[1:]
    assert [p.split()[0] for p in parts] == ["sample", "evaluate", "noising"], out[-3000:]
    for part in parts:
        name, module_file, body = part.split(maxsplit=2)
        assert Path(module_file) == site / "diffusion_lab" / f"{name}.py"
        assert yaml.safe_load(body)["task_name"] == name, body[-2000:]


@pytest.mark.slow  # minutes of multi-process or wheel work: make test-slow
def test_installed_wheel_trains_one_step_from_any_folder(site, tmp_path):
    overrides = {o.split("=", 1)[0]: o for o in [*TINY, "trainer.max_steps=1", "trainer.val_check_interval=1"]}
    _run([sys.executable, "-m", "diffusion_lab.train", *overrides.values()], cwd=tmp_path, env=_env(site), timeout=600)
    runs = list((tmp_path / "outputs" / "train" / "runs").iterdir())  # paths.root_dir is the current folder
    assert len(runs) == 1, runs
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file()
    assert (runs[0] / "pipeline" / "model_index.json").is_file()
    hydra_cfg = yaml.safe_load((runs[0] / ".hydra" / "hydra.yaml").read_text())
    assert _main_config_dir(hydra_cfg) == site / "diffusion_lab" / "conf"


USER_EXPERIMENT = """\
# @package _global_
defaults:
  - override /logger: csv
task_name: my_exp
tags: [from_my_conf]
user_note: set only by my_conf/experiment/my_exp.yaml
data:
  batch_size: 7
"""


@pytest.mark.parametrize("install", [pytest.param("wheel", marks=pytest.mark.slow), "checkout"])
def test_config_dir_adds_user_experiment(install, request, tmp_path):
    """``--config-dir my_conf experiment=my_exp``: a ``# @package _global_`` experiment that lives
    outside the project, composed over the packaged configs (and overriding their groups)."""
    if install == "wheel":
        pythonpath = request.getfixturevalue("site")
        packaged = pythonpath / "diffusion_lab" / "conf"
    else:  # the source tree, as `make install` (editable) or PYTHONPATH=<repo> runs it
        pythonpath, packaged = REPO, CONF
    my_conf = tmp_path / "my_conf"
    (my_conf / "experiment").mkdir(parents=True)
    (my_conf / "experiment" / "my_exp.yaml").write_text(USER_EXPERIMENT)
    assert not (CONF / "experiment" / "my_exp.yaml").exists()

    cmd = [sys.executable, "-m", "diffusion_lab.train", "--config-dir", str(my_conf), "experiment=my_exp", "--cfg", "all"]
    cfg = _cfg_all(_run(cmd, cwd=tmp_path, env=_env(pythonpath)).stdout)
    assert cfg["user_note"] == "set only by my_conf/experiment/my_exp.yaml"
    assert cfg["task_name"] == "my_exp" and cfg["tags"] == ["from_my_conf"]
    assert cfg["data"]["batch_size"] == 7
    assert list(cfg["logger"]) == ["csv"]  # the packaged conf/logger/csv.yaml replaced the default
    assert cfg["logger"]["csv"]["_target_"] == "pytorch_lightning.loggers.CSVLogger"
    assert cfg["hydra"]["runtime"]["choices"]["experiment"] == "my_exp"
    assert _main_config_dir(cfg) == packaged
    sources = {s["provider"]: s for s in cfg["hydra"]["runtime"]["config_sources"]}
    assert Path(sources["command-line"]["path"]) == my_conf
