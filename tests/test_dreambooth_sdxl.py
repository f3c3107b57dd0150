"""#29 item 11: DreamBooth on SDXL is refused before training with a message naming SDXL
(it stopped on a cross_attention_dim mismatch, or a TypeError with model=latent_sdxl)."""

from __future__ import annotations

import pytest

from diffusion_lab.components import tiny
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import compose_cfg


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> str:
    return str(tiny.build(tmp_path_factory.mktemp("tiny") / "tiny_sdxl", kind="sdxl"))


@pytest.mark.parametrize("family", [[], ["model=latent_sdxl"]], ids=["sd_model_on_an_sdxl_folder", "model=latent_sdxl"])
def test_dreambooth_on_sdxl_is_a_config_error_naming_sdxl(tiny_sdxl, tmp_path, family):
    overrides = ["experiment=dreambooth_tiny", *family, f"model.pretrained={tiny_sdxl}", f"data.class_dir={tmp_path / 'class'}", "data.num_class_images=2"]
    with pytest.raises(Exception) as raised:  # hydra's InstantiationException around it (the CLI unwraps it)
        train(compose_cfg("train", overrides, tmp_path / "run"))
    e = raised.value
    while e is not None and not isinstance(e, ConfigError):
        e = e.__cause__
    assert e is not None and "DreamBooth here is for SD 1.x/2.x" in str(e) and "model=latent_sdxl" in str(e), raised.value
    assert not (tmp_path / "class").exists()  # refused before any class image was made
