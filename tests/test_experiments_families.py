"""experiments/families/run.py: every family's study run composes from its real experiment config with the study's
overrides (the resolution its pipeline accepts, edit pairs for the edit families), so the study's commands keep
working as configs change."""

import importlib.util
from pathlib import Path

import pytest

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
