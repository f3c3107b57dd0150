"""experiments/families/run.py: every family's study run composes from its real experiment config with the study's
overrides (the resolution its pipeline accepts, edit pairs for the edit families), so the study's commands keep
working as configs change."""

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("families_study", ROOT / "experiments" / "families" / "run.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def test_the_study_covers_every_family():
    from diffusion_lab.families.matrix import families

    assert sorted(f"latent_{f}" for f in study.FAMILIES) == sorted(families())


@pytest.mark.parametrize("family", study.FAMILIES)
def test_each_family_run_composes(family, tmp_path):
    cfg = compose_cfg("train", study.overrides(family, tmp_path), tmp_path / "run")
    assert cfg.model.pretrained == str(tmp_path / "pipelines" / family)
    assert cfg.data.resolution == (32 if family == "sana" else 16)
    if family in study.EDIT:
        assert cfg.data.paired_images == {"source_image": "source_pixel_values"} and cfg.model.family.source_key == "source_pixel_values"
    else:
        assert cfg.data.datamodule.dataset._target_.endswith("DigitsDataset")


def test_sana_diagnostic_pipelines(tmp_path):
    """The Sana diagnostics train what their names say: ``sana_f32`` a DC-AE as deep as Sana's (32x: 1x1 latents at
    32 px) under a transformer for them; the backbone variants the family's pipeline with only the backbone changed."""
    import json

    from diffusers import AutoencoderDC, SanaTransformer2DModel

    from diffusion_lab.testing.sana import tiny_pipeline

    tiny_pipeline().save_pretrained(tmp_path / "tiny" / "sana")
    study.sana_f32(tmp_path / "tiny" / "sana", tmp_path / "tiny" / "sana_f32")
    vae = AutoencoderDC.from_pretrained(tmp_path / "tiny" / "sana_f32" / "vae")
    assert vae.spatial_compression_ratio == 32 and tuple(vae.encode(torch.zeros(1, 3, 32, 32)).latent.shape) == (1, 32, 1, 1)
    assert SanaTransformer2DModel.from_pretrained(tmp_path / "tiny" / "sana_f32" / "transformer").config.sample_size == 1
    cfg = compose_cfg("train", study.overrides("sana_f32", tmp_path), tmp_path / "run")
    assert cfg.model.pretrained == str(tmp_path / "pipelines" / "sana_f32") and cfg.data.resolution == 32

    shutil.copytree(tmp_path / "tiny" / "sana", tmp_path / "pipelines" / "sana")
    study.backbone_variants(tmp_path)
    base = json.loads((tmp_path / "pipelines" / "sana" / "transformer" / "config.json").read_text())
    for name, changes in study.BACKBONES.items():
        config = json.loads((tmp_path / "pipelines" / name / "transformer" / "config.json").read_text())
        assert {k: v for k, v in config.items() if base.get(k) != v and not k.startswith("_")} == changes
        assert (tmp_path / "pipelines" / name / "vae").exists()
