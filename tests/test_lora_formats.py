"""LoRA export formats (``callbacks.export.lora_format=diffusers|kohya|both``) and their refusals before
training (``export/kohya.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_lab.components import tiny
from diffusion_lab.components.adapters import KOHYA_FILE, add_lora, lora_config
from diffusion_lab.export.kohya import save_lora_files
from diffusion_lab.export.lora_tools import LORA_FILE
from diffusion_lab.families.sd import StableDiffusion
from diffusion_lab.utils.errors import ConfigError

ATOL = 1e-5  # images in [0, 1]: float32 rounding of the factor rescaling only


def images(pipe) -> np.ndarray:
    return pipe("a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", height=32, width=32).images


@pytest.mark.parametrize(("lora_format", "files"), [("diffusers", {LORA_FILE}), ("kohya", {KOHYA_FILE}), ("both", {LORA_FILE, KOHYA_FILE})])
def test_lora_format_writes_the_files_asked_for(lora_format, files, tmp_path):
    """Each format writes its files only; the kohya-only file alone gives the diffusers file's images."""
    trained = tiny.tiny_sd_pipeline()
    add_lora(trained.unet, lora_config(rank=4, alpha=8, init=False))
    save_lora_files(StableDiffusion(), str(tmp_path), trained.unet, {}, lora_format)
    assert {p.name for p in tmp_path.iterdir()} == files
    pipe = tiny.tiny_sd_pipeline()
    pipe.load_lora_weights(tmp_path, weight_name=next(iter(files)) if len(files) == 1 else LORA_FILE)
    want = images(trained)
    assert np.abs(want - images(tiny.tiny_sd_pipeline())).max() > 1e-3  # the LoRA changes the images
    np.testing.assert_allclose(images(pipe), want, atol=ATOL, rtol=0)


def _train(tmp_path, *overrides):
    from diffusion_lab.train import train
    from tests.conftest import compose_cfg
    from tests.test_latent_train import FAST

    fast = [o for o in FAST if not o.startswith("experiment=")]
    cfg = compose_cfg("train", [*overrides, *fast, "callbacks.sample_grid=null"], tmp_path / "run")
    return train(cfg)


@pytest.mark.parametrize(
    ("kind", "overrides", "match"),
    [
        ("sd3", ["experiment=sd3_finetune_tiny", "adapter=lora"], r"callbacks\.export\.lora_format=kohya .*model=latent_sd3"),
        ("sd", ["experiment=sd_finetune_tiny", "adapter=dora"], r"callbacks\.export\.lora_format=kohya .*DoRA"),
        ("sd", ["experiment=sd_finetune_tiny", "adapter=lokr"], r"callbacks\.export\.lora_format=kohya with adapter=lokr"),
    ],
)
def test_kohya_format_that_cannot_be_written_is_refused_before_training(kind, overrides, match, tmp_path):
    folder = tiny.build(tmp_path / "tiny", kind=kind)
    with pytest.raises(ConfigError, match=match):
        _train(tmp_path, *overrides, f"model.pretrained={folder}", "callbacks.export.lora_format=kohya")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before the first step


def test_unknown_lora_format_is_refused(tmp_path):
    folder = tiny.build(tmp_path / "tiny", kind="sd")
    with pytest.raises(ConfigError, match=r"callbacks\.export\.lora_format='safetensors' is not one of diffusers, kohya, both"):
        _train(tmp_path, "experiment=sd_finetune_tiny", "adapter=lora", f"model.pretrained={folder}", "callbacks.export.lora_format=safetensors")


def test_trained_run_with_kohya_format_exports_the_kohya_file_only(tmp_path):
    folder = tiny.build(tmp_path / "tiny", kind="sd")
    _train(tmp_path, "experiment=sd_finetune_tiny", "adapter=lora", f"model.pretrained={folder}", "callbacks.export.lora_format=kohya")
    (lora_dir,) = {p.parent for p in (tmp_path / "run").rglob(KOHYA_FILE)}
    assert not (lora_dir / LORA_FILE).exists()
