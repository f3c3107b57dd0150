"""ControlNet (controlnet=from_backbone) on the transformer families that diffusers has a ControlNet pipeline for beyond
SD / SDXL / SD3 / FLUX.1: Qwen-Image, Sana, Z-Image. The exported <run>/controlnet loads with the class its config names
and runs in the family's ControlNet pipeline beside the base folder, which samples what the module samples for the
same control image and seed (the shared checks: tests/family_checks.py)."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from hydra.utils import instantiate

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.components.controlnet import Z_IMAGE_SHARED, controlnet_from_backbone
from diffusion_lab.export.controlnet import save_controlnet
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import compose_cfg
from tests.family_checks import assert_controlnet_samples_like_the_module, tiny_folders

KINDS = ["qwen_image", "sana", "z_image"]
CONTROLNET = ["controlnet=from_backbone", "++data.control=edges"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_folders(tmp_path_factory.mktemp("tiny"))


def _load(run_dir, folder, family):
    """The export as a user loads it: the class its config names, in the family's ControlNet pipeline beside the base."""
    name = json.loads((run_dir / "config.json").read_text())["_class_name"]
    net = getattr(diffusers, name).from_pretrained(run_dir)
    base = getattr(diffusers, family.pipeline_class).from_pretrained(folder)
    return getattr(diffusers, family.controlnet_pipeline_class)(**base.components, controlnet=net), base


@pytest.mark.parametrize("kind", KINDS)
def test_an_untrained_controlnet_exports_and_samples_like_the_module(kind, folders, tmp_path):
    """Built from the tiny backbone with its zero layers filled in (so the control matters), written by the export,
    read back by plain diffusers: the family's ControlNet pipeline gives the module's images (CFG included for Sana
    and Z-Image); a zero conditioning scale gives the base pipeline's."""
    folder = folders(kind)
    module = instantiate(compose_cfg("train", [f"experiment={kind}_finetune_tiny", f"model.pretrained={folder}", *CONTROLNET], tmp_path / "c").model)
    assert type(module.controlnet).__name__ == {"qwen_image": "QwenImageControlNetModel", "sana": "SanaControlNetModel", "z_image": "ZImageControlNetModel"}[kind]
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("controlnet.") for n in trainable)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # what training would do to the zero-initialised projections
        for p in module.controlnet.parameters():
            if p.requires_grad and p.abs().max() == 0:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    module.eval()
    save_controlnet(module, tmp_path / "controlnet")
    if kind == "z_image":  # only its own weights: embedders and refiners are the base transformer's
        from safetensors.torch import load_file

        keys = load_file(tmp_path / "controlnet" / "diffusion_pytorch_model.safetensors")
        assert keys and not any(k.split(".")[0] in Z_IMAGE_SHARED for k in keys)
    pipe, base = _load(tmp_path / "controlnet", folder, module.family)
    assert_controlnet_samples_like_the_module(kind, module, pipe, base)
    # controlnet.pretrained=<run>/controlnet goes on training it: the same weights (Z-Image's again on the backbone's parts)
    again = controlnet_from_backbone(module.base_backbone, module.codec.downsample_factor, pretrained=str(tmp_path / "controlnet"))
    assert type(again) is type(module.controlnet) and again.state_dict().keys() == module.controlnet.state_dict().keys()
    for name, p in again.state_dict().items():
        torch.testing.assert_close(p, module.controlnet.state_dict()[name], rtol=0, atol=0)


def test_sana_transformers_its_controlnet_cannot_mirror_are_config_errors():
    from diffusion_lab.testing.sana import tiny_sana_transformer as tiny_transformer

    for odd in ({"qk_norm": "rms_norm_across_heads"}, {"guidance_embeds": True}, {"timestep_scale": 0.5}):
        with pytest.raises(ConfigError, match=f"controlnet=from_backbone: the Sana transformer has {{'{next(iter(odd))}'"):
            controlnet_from_backbone(tiny_transformer(**odd), downsample_factor=4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_trained_controlnet_steers_the_exported_pipeline_like_the_module(kind, folders, tmp_path):
    """Four steps of controlnet=from_backbone on the tiny recipe: only the ControlNet trains (the transformer is
    bit-identical to the base), and what was trained (its EMA) is what <run>/controlnet holds and samples."""
    folder, run = folders(kind), tmp_path / "run"
    overrides = [f"experiment={kind}_finetune_tiny", f"model.pretrained={folder}", *CONTROLNET, "model.optimizer.lr=1e-2",
                 "callbacks.export.dirpath=${paths.output_dir}/controlnet", "trainer.max_steps=4", "trainer.val_check_interval=4",
                 "trainer.limit_val_batches=1", "data.batch_size=2", "model.preview_steps=2", "callbacks.sample_grid=null",
                 "callbacks.progress_bar=null", "callbacks.noising_strip=null", "callbacks.model_checkpoint.every_n_train_steps=4",
                 "logger=csv", "trainer=cpu"]
    _, objects = train(compose_cfg("train", overrides, run))
    module = objects["model"]
    pipe, base = _load(run / "controlnet", folder, module.family)
    for name, p in base.transformer.state_dict().items():  # the backbone is frozen
        torch.testing.assert_close(module.base_backbone.state_dict()[name], p, rtol=0, atol=0)
    module.eval()
    with ema_weights(objects["trainer"], module):
        exported = pipe.controlnet.state_dict()
        for name, p in exported.items():
            torch.testing.assert_close(p, module.controlnet.state_dict()[name], rtol=0, atol=0)
        # four steps from zero projections: the control path has only begun to train (small, but far above zero)
        assert_controlnet_samples_like_the_module(kind, module, pipe, base, steers=1e-5)
