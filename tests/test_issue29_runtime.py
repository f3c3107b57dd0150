"""Issue 29, runtime items: prepare on a CUDA device the machine lacks (item 7), the train command
prepare prints for encoded shards and the text-encoder mismatch message (smaller items), the run
dir of paths.output_dir (item 9)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from diffusion_lab.data.shards import MANIFEST, check_shards_fit_model
from diffusion_lab.data.shards.prepare import prepare, train_command
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import compose_cfg

LATENT = ["model=latent_sd", "vae=tiny", "text_encoder=tiny", "backbone=sd_tiny", "process=vp_sd"]
DATA = ["data=digits_captioned", "data.resolution=16", "data.val_fraction=0.97"]


def run_prepare(tmp_path: Path, *overrides: str) -> tuple[dict, Path]:
    out = tmp_path / "shards"
    cfg = compose_cfg("prepare", [*overrides, f"out_dir={out}", "prepare.num_workers=1", "prepare.batch_size=8"], tmp_path / "run")
    return prepare(cfg), out


# ---- item 7: prepare.device=cuda without CUDA ----------------------------------------------------------
def test_prepare_on_a_cuda_device_the_machine_lacks_is_refused_before_any_work(tmp_path, monkeypatch):
    """It ended in a litdata worker traceback ("Torch not compiled with CUDA enabled", then
    "Failed processing item=...")."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match=r"^prepare.device=cuda but .* use prepare.device=cpu, or auto"):
        run_prepare(tmp_path, *DATA, *LATENT, "prepare.encode=true", "prepare.device=cuda")
    assert not (tmp_path / "shards").exists()
    with pytest.raises(ConfigError, match=r"^prepare.device='tpu' is not a device"):
        run_prepare(tmp_path, *DATA, *LATENT, "prepare.encode=true", "prepare.device=tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"^prepare.device=cuda:2 but torch sees 2 CUDA device\(s\)"):
        run_prepare(tmp_path, *DATA, *LATENT, "prepare.encode=true", "prepare.device=cuda:2")
    assert not (tmp_path / "shards").exists()


# ---- smaller: the train hint after prepare.encode=true, the text-encoder mismatch message ---------------
@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("encoded")
    manifest, out = run_prepare(tmp, *DATA, *LATENT, "prepare.encode=true")
    return manifest, out, tmp


def hinted_overrides(manifest: dict, out: Path) -> list[str]:
    command = shlex.split(train_command(str(out), manifest))
    assert command[:3] == ["python", "-m", "diffusion_lab.train"]
    return command[3:]


def test_train_hint_after_encoding_names_the_model_and_runs_as_printed(encoded):
    """The hint omitted model=, so run as printed it failed with "holds VAE latents ... but this
    model has no VAE"."""
    manifest, out, tmp = encoded
    overrides = hinted_overrides(manifest, out)
    assert overrides == ["data=shards", f"data.root={out}", "data.resolution=16", "data.channels=3", *LATENT]
    module = instantiate(compose_cfg("train", overrides, tmp / "train").model)
    check_shards_fit_model(manifest, module, str(out))  # the model the shards hold: accepted
    # the model= default is named too when the user did not type it (prepare's model= is then refused, so a latent
    # model always comes from the command line; this checks only the hint's spelling)
    pixel = dict(manifest, kind="pixels")
    assert "model=" not in train_command(str(out), pixel)


def test_shards_of_another_model_name_the_model_they_were_prepared_with(encoded):
    """The text-encoder message dumped the stored encoder config and ended "than this run's
    text_encoder=;" (empty)."""
    manifest, out, tmp = encoded
    overrides = hinted_overrides(manifest, out)
    other = instantiate(compose_cfg("train", [*overrides, "+text_encoder.text_encoder.seed=1"], tmp / "other").model)
    with pytest.raises(ConfigError) as raised:
        check_shards_fit_model(manifest, other, str(out))
    message = str(raised.value)
    assert "stores text states of another text encoder" in message and "text_encoder=;" not in message
    assert "_target_" not in message and "than this run's text_encoder= (" in message
    assert f"prepared with ({' '.join(LATENT)})" in message
    pixel = instantiate(compose_cfg("train", ["backbone=tiny", *overrides[:4]], tmp / "pixel").model)
    with pytest.raises(ConfigError, match=rf"holds VAE latents \(prepared with {' '.join(LATENT)}\) but this model has no VAE"):
        check_shards_fit_model(manifest, pixel, str(out))
    assert (out / MANIFEST).is_file()


# ---- item 9: paths.output_dir is the run dir, train.log and .hydra/ included ------------------------------
ROOT = Path(__file__).resolve().parents[1]


def test_paths_output_dir_holds_everything_the_run_writes(tmp_path):
    """With paths.output_dir=DIR the run printed "run dir: DIR", but train.log and .hydra/ went to
    ./outputs/train/runs/<time>/. A run that fails on its data (after Hydra made its run dir) is enough."""
    import os
    import subprocess
    import sys

    run_dir, cwd = tmp_path / "mine", tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("PROJECT_ROOT", None)
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion_lab.train", f"paths.output_dir={run_dir}", "data=image_folder", f"data.root={tmp_path / 'none'}",
         "logger=csv", "trainer=cpu"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and "is not a directory" in proc.stderr, proc.stderr[-2000:]
    assert (run_dir / "train.log").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert not (cwd / "outputs").exists(), sorted(str(p) for p in (cwd / "outputs").rglob("*"))
