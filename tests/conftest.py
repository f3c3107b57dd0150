"""Test helpers: compose the real configs from conf/, shrink them, run them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import diffusion_lab  # noqa: F401  (resolvers)

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# Tests run tiny models: one thread is faster than two on 2 cores (and many times faster when the
# cores are shared with other processes, e.g. the 2-process DDP tests). Subprocesses inherit it.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

os.environ.setdefault("WANDB_MODE", "offline")  # tests never touch the network
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Overrides that make any training config run in seconds on CPU.
TINY = [
    "backbone=tiny",
    "trainer=cpu",
    "logger=csv",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "data.batch_size=8",
    "model.preview_steps=2",
    "callbacks.sample_grid.every_n_steps=2",
    "callbacks.sample_grid.num_images=4",
    "callbacks.progress_bar=null",
    "callbacks.model_checkpoint.every_n_train_steps=2",
]


def compose_cfg(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` like ``@hydra.main`` would, with ``paths.output_dir``
    pointing at ``output_dir`` (HydraConfig is set so ``${hydra:...}`` resolves)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
        del cfg.hydra
    return cfg


@pytest.fixture
def train_cfg(tmp_path):
    """``train_cfg(*overrides)`` -> a tiny, CPU, CSV-logged train config writing under tmp_path."""

    def make(*overrides: str, tiny: bool = True) -> DictConfig:
        return compose_cfg("train", (TINY if tiny else []) + list(overrides), tmp_path / "run")

    return make


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory) -> Path:
    """One 2-process DDP job (W&B offline) on the CURVE settings, shared by tests/test_ddp.py and
    the FSDP comparison in tests/test_fsdp.py."""
    from tests.multiproc import CURVE, PROBE, run_cli, tiny

    logs = tmp_path_factory.mktemp("ddp")
    run_dir = logs / "run"
    proc = run_cli(tiny("trainer=ddp_cpu", "logger=wandb", *CURVE, *PROBE, f"hydra.run.dir={run_dir}"), logs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir
