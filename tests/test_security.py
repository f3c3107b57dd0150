"""#29 item 14: a shared checkpoint cannot run code on the machine that samples from it.

Two ways a crafted ``.ckpt`` could: its pickle (``__reduce__`` calls any function while the file
is read), and the config stored in it (``instantiate`` calls any ``_target_``). Each payload here
would write a file; the file must not appear, and the refusal names what the checkpoint asked for.
A checkpoint the project trains still samples, and ``trust_checkpoint=true`` reads any file.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusion_lab.evaluate import run as run_evaluate
from diffusion_lab.inference.checkpoints import load_module
from diffusion_lab.posthoc_ema import run as run_posthoc
from diffusion_lab.sample import run as run_sample
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.safe_load import check_config, load_checkpoint
from tests.conftest import TINY, compose_cfg

ROOT = Path(__file__).resolve().parents[1]


class WritesAFile:
    """Unpickling this calls ``shutil.copyfile(src, marker)``."""

    def __init__(self, src: Path, marker: Path) -> None:
        self.src, self.marker = src, marker

    def __reduce__(self):
        return (shutil.copyfile, (str(self.src), str(self.marker)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny pixel run (checkpoint and post-hoc EMA snapshots), as ``diffusion_lab.train`` writes it."""
    out = tmp_path_factory.mktemp("security") / "run"
    train(compose_cfg("train", [*TINY, "trainer.max_steps=2", "callbacks.posthoc_ema.every_n_steps=1", "callbacks.sample_grid=null"], out))
    return out


def crafted(run_dir: Path, tmp_path: Path, node: dict | None = None, pickled: object | None = None) -> Path:
    """The run's checkpoint with ``node`` added to its stored model config (as ``model.extra``)
    and/or ``pickled`` stored beside the weights."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    if node is not None:
        ckpt["diffusion_lab_config"]["model"]["extra"] = node
    if pickled is not None:
        ckpt["extra"] = pickled
    path = tmp_path / "shared.ckpt"
    torch.save(ckpt, path)
    return path


def test_a_pickle_payload_is_not_run_by_sample_evaluate_or_posthoc_ema(run_dir, tmp_path):
    marker = tmp_path / "pwned.txt"
    ckpt = crafted(run_dir, tmp_path, pickled=WritesAFile(run_dir / "config.yaml", marker))
    with pytest.raises(ConfigError, match=r"shutil\.copyfile.*trust_checkpoint=true"):
        run_sample(compose_cfg("sample", [f"ckpt_path={ckpt}", "num_images=1", "num_inference_steps=1"], tmp_path / "s"))
    with pytest.raises(ConfigError, match="trust_checkpoint=true"):
        run_evaluate(compose_cfg("evaluate", [f"ckpt_path={ckpt}", "num_images=1", "num_inference_steps=1", "logger=none"], tmp_path / "e"))
    with pytest.raises(ConfigError, match="trust_checkpoint=true"):
        run_posthoc(compose_cfg("posthoc_ema", [f"run={run_dir}", f"ckpt_path={ckpt}", f"out_dir={tmp_path / 'p'}"], tmp_path / "p"))
    assert not marker.exists()
    # the command line: one paragraph, exit 2, no traceback, no file
    res = subprocess.run(
        [sys.executable, "-m", "diffusion_lab.sample", f"ckpt_path={ckpt}", "num_images=1", f"out_dir={tmp_path / 'cli'}", f"hydra.run.dir={tmp_path / 'h'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr and "shutil.copyfile" in res.stderr, res.stderr[-2000:]
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        {"_target_": "shutil.copyfile", "src": "{src}", "dst": "{marker}"},
        {"_target_": "pathlib.Path.write_text", "_args_": ["{marker}", "pwned"]},
        {"_target_": "torch.save", "obj": "pwned", "f": "{marker}"},  # in an allowed package, and still a file write
        {"_target_": "diffusion_lab.utils.io.atomic_write_bytes", "_args_": ["{marker}", "pwned"]},
        {"stage": "${oc.create:'{_target_: shutil.copyfile, src: {src}, dst: {marker}}'}"},  # a _target_ made by a resolver
        {"_target_": "diffusion_lab.components.schedulers.build_scheduler", "class_name": "torch.hub.load_state_dict_from_url"},
        {"_target_": "diffusion_lab.components.quantization.load_kwargs", "library": "antigravity", "backend": None, "weights": None},
    ],
    ids=["shutil.copyfile", "Path.write_text", "torch.save", "project_file_writer", "oc.create", "class_name", "library"],
)
def test_a_stored_config_naming_other_code_is_not_built(run_dir, tmp_path, payload):
    marker = tmp_path / "pwned.txt"
    src = run_dir / "config.yaml"
    node = OmegaConf.to_container(OmegaConf.create(payload))
    fill = lambda v: v.replace("{marker}", str(marker)).replace("{src}", str(src)) if isinstance(v, str) else [fill(x) for x in v] if isinstance(v, list) else v  # noqa: E731
    node = {k: fill(v) for k, v in node.items()}
    ckpt = crafted(run_dir, tmp_path, node=node)
    with pytest.raises(ConfigError, match=r"model\.extra.*trust_checkpoint=true"):
        load_module(str(ckpt))
    with pytest.raises(ConfigError, match=r"model\.extra"):
        run_sample(compose_cfg("sample", [f"ckpt_path={ckpt}", "num_images=1", "num_inference_steps=1"], tmp_path / "s"))
    assert not marker.exists()


def test_trust_checkpoint_reads_a_file_you_trust(run_dir, tmp_path):
    """The opt-in is real: with it the pickle is read as it is (here its payload runs)."""
    marker = tmp_path / "pwned.txt"
    ckpt = crafted(run_dir, tmp_path, pickled=WritesAFile(run_dir / "config.yaml", marker))
    load_checkpoint(ckpt, trust=True)
    assert marker.read_text() == (run_dir / "config.yaml").read_text()


def test_a_checkpoint_the_project_trains_still_samples(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    grid = run_sample(compose_cfg("sample", [f"ckpt_path={ckpt}", "num_images=2", "num_inference_steps=2"], tmp_path / "s"))
    assert grid.is_file()
    assert load_module(str(ckpt), trust=True).run_config == load_module(str(ckpt)).run_config
    # a user's own optimizer / LR scheduler class of torch is a class that only builds an object
    check_config({"optimizer": {"_target_": "torch.optim.SGD", "_partial_": True}, "lr_scheduler": {"_target_": "torch.optim.lr_scheduler.StepLR"}}, "x")


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_experiments_stored_config_passes_the_check(experiment, tmp_path):
    """What ``train`` stores for each experiment (its resolved model config) is built without trust_checkpoint."""
    cfg = compose_cfg("train", [f"experiment={experiment}"], tmp_path)
    check_config(OmegaConf.to_container(cfg.model, resolve=True), experiment)
