"""Every config composes; every option of every group composes; every experiment instantiates."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import CONF_DIR, TINY, compose_cfg

# Train-config groups whose options are swapped on the command line (group -> folder).
GROUPS = ["process", "sampler", "data", "model", "model/unet", "trainer", "logger", "callbacks", "debug", "hparams_search"]
EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))

# How to shrink each experiment so it instantiates in seconds; pixel experiments swap the tiny
# UNet, others add their own entry.
SHRINK: dict[str, list[str]] = {
    # the digits latent stack reads earlier stages' exports: tiny stand-ins of the same shapes
    "vae_digits": [],
    "ldm_digits": ["vae=tiny"],
    "ldm_digits_lora": ["model/unet=ldm_digits", "vae=tiny", "text_encoder=vocab", "process=vp", "sampler=dpmpp"],
    # SD recipes load every part from model.pretrained: point it at a tiny random SD pipeline
    "sd_finetune": ["model.pretrained={tiny_sd}", "data.resolution=32"],
    "sd_finetune_tiny": ["model.pretrained={tiny_sd}"],
    # SDXL recipes: a tiny random SDXL base pipeline
    "sdxl_finetune_tiny": ["model.pretrained={tiny_sdxl}"],
    "sdxl_lora": ["model.pretrained={tiny_sdxl}", "data.resolution=32"],
}


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory) -> str:
    from diffusion_lab import tiny_sd

    return str(tiny_sd.build(tmp_path_factory.mktemp("tiny") / "tiny_sd"))


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory) -> str:
    from diffusion_lab import tiny_sd

    return str(tiny_sd.build(tmp_path_factory.mktemp("tiny") / "tiny_sdxl", kind="sdxl"))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes(group, option, tmp_path):
    extra = ["data.root=/nonexistent"] if option == "image_folder" else []
    cfg = compose_cfg("train", [f"{group}={option}", *extra], tmp_path)
    assert cfg.model._target_ and cfg.trainer._target_


@pytest.mark.parametrize("name", ["train", "sample", "noising"] + (["evaluate"] if (Path(CONF_DIR) / "evaluate.yaml").exists() else []))
def test_entry_configs_compose(name, tmp_path):
    compose_cfg(name, [], tmp_path)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_instantiates(experiment, tmp_path, request):
    # GPU experiments are checked on CPU here: same config, accelerator swapped.
    shrink = SHRINK.get(experiment, ["model/unet=tiny"]) + ["trainer.accelerator=cpu"]
    for name in ("tiny_sd", "tiny_sdxl"):
        if any(f"{{{name}}}" in o for o in shrink):
            shrink = [o.replace(f"{{{name}}}", request.getfixturevalue(f"{name}_dir")) for o in shrink]
    cfg = compose_cfg("train", [f"experiment={experiment}", *shrink], tmp_path)
    model = instantiate(cfg.model)
    n = model.latent_shape(2)
    assert len(n) == 4
    instantiate(cfg.trainer, logger=False, callbacks=[])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp", "euler", "heun", "pndm", "unipc"])
def test_sampler_swap_keeps_the_training_schedule(sampler, tmp_path):
    """`sampler=X` changes the sampling class, not the training noise schedule."""
    model = instantiate(compose_cfg("train", [*TINY, f"sampler={sampler}"], tmp_path).model)
    ref = instantiate(compose_cfg("train", [*TINY, "sampler=default"], tmp_path).model)
    assert type(model.sampling_scheduler()).__name__ == model.sampler.classes["vp"].split(".")[-1]
    torch.testing.assert_close(model.process.scheduler.alphas_cumprod, ref.process.scheduler.alphas_cumprod)
    torch.testing.assert_close(model.sampling_scheduler().alphas_cumprod, ref.process.scheduler.alphas_cumprod)


def test_data_resolution_links_into_unet(tmp_path):
    cfg = compose_cfg("train", ["data.resolution=24", "model/unet=tiny"], tmp_path)
    assert cfg.model.unet.sample_size == 24 and cfg.model.unet.in_channels == cfg.data.channels == 1
