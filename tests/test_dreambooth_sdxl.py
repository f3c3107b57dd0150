"""DreamBooth is a method, not an SD 1.x class (#25): prior preservation trains on SDXL with class
images its own base model generates; an SDXL folder under the SD 1.x family is refused naming SDXL
(#29 item 11: it stopped on a cross_attention_dim mismatch)."""

from __future__ import annotations

import pytest

from diffusion_lab.testing import tiny
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import compose_cfg

FAST = ["trainer.max_steps=2", "callbacks.sample_grid=null", "callbacks.progress_bar=null", "data.num_class_images=2", "data.max_instances=2", "data.batch_size=4", "data.class_steps=2"]


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> str:
    return str(tiny.build(tmp_path_factory.mktemp("tiny") / "tiny_sdxl", kind="sdxl"))


def test_dreambooth_trains_sdxl_with_its_own_class_images(tiny_sdxl, tmp_path):
    overrides = ["experiment=dreambooth_tiny", "model=latent_sdxl", f"model.pretrained={tiny_sdxl}", f"data.class_dir={tmp_path / 'class'}", *FAST]
    _, objects = train(compose_cfg("train", overrides, tmp_path / "run"))
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    metrics = objects["trainer"].callback_metrics
    assert {"train/instance_loss", "train/prior_loss"} <= set(metrics)
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()


def test_an_sdxl_folder_under_the_sd_family_is_a_config_error_naming_sdxl(tiny_sdxl, tmp_path):
    overrides = ["experiment=dreambooth_tiny", f"model.pretrained={tiny_sdxl}", f"data.class_dir={tmp_path / 'class'}", *FAST]
    with pytest.raises(Exception) as raised:  # hydra's InstantiationException around it (the CLI unwraps it)
        train(compose_cfg("train", overrides, tmp_path / "run"))
    e = raised.value
    while e is not None and not isinstance(e, ConfigError):
        e = e.__cause__
    assert e is not None and "SDXL UNet" in str(e) and "model=latent_sdxl" in str(e), raised.value
    assert not (tmp_path / "class").exists()  # refused before any class image was made
