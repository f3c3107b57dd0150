"""#28: the tiny test/demo builders moved from ``diffusion_lab/components/{tiny,vocab}.py`` to
``diffusion_lab/testing/``; a checkpoint written before the move, whose stored config names the old
paths, still loads (``load_module``) and samples (``diffusion_lab.sample ckpt_path=...``)."""

from __future__ import annotations

import json

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_lab.inference.checkpoints import load_module, moved_paths
from diffusion_lab.sample import run as run_sample
from tests.conftest import compose_cfg

LATENT = ["model=latent_sd", "vae=tiny", "text_encoder=vocab", "text_encoder.text_encoder.hidden_size=32", "backbone=sd_tiny", "process=vp_sd", "data=digits_captioned", "logger=csv"]


def old_paths(config: dict) -> dict:
    """``config`` as a checkpoint written before #28 stored it."""
    text = json.dumps(config).replace("diffusion_lab.testing.tiny.", "diffusion_lab.components.tiny.")
    return json.loads(text.replace("diffusion_lab.testing.vocab.", "diffusion_lab.components.vocab."))


def test_moved_paths_renames_only_the_moved_modules():
    node = {"_target_": "diffusion_lab.components.vocab.vocab_tokenizer", "a": ["diffusion_lab.components.tiny.tiny_vae", 3], "b": "diffusion_lab.components.text.TextConditioner"}
    assert moved_paths(node) == {"_target_": "diffusion_lab.testing.vocab.vocab_tokenizer", "a": ["diffusion_lab.testing.tiny.tiny_vae", 3], "b": "diffusion_lab.components.text.TextConditioner"}
    assert node["_target_"] == "diffusion_lab.components.vocab.vocab_tokenizer"  # the caller's container is kept


def test_a_checkpoint_naming_the_old_builder_paths_loads_and_samples(tmp_path):
    cfg = compose_cfg("train", LATENT, tmp_path / "run")
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    config = old_paths(OmegaConf.to_container(cfg, resolve=True))
    stored = json.dumps(config["model"])
    assert "diffusion_lab.components.tiny.tiny_vae" in stored and "diffusion_lab.components.vocab.vocab_text_encoder" in stored
    ckpt = tmp_path / "before_28.ckpt"
    torch.save({"state_dict": model.state_dict(), "diffusion_lab_config": config}, ckpt)

    module = load_module(str(ckpt), use_ema=False)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(module.state_dict()[name], tensor, msg=name)
    assert "diffusion_lab.testing.tiny.tiny_vae" in json.dumps(module.run_config["model"])

    grid = run_sample(compose_cfg("sample", [f"ckpt_path={ckpt}", "num_images=1", "num_inference_steps=1", "prompt=seven"], tmp_path / "s"))
    assert grid.is_file()


def test_the_tiny_mmdit_backbones_old_paths_build_from_their_new_module():
    """backbone=sd3_tiny|flux_tiny moved again (``testing/tiny.py`` -> ``testing/tiny_mmdit.py``): a stored
    config naming either older path builds the same transformer from the new one."""
    for k in ("sd3", "flux"):
        want = OmegaConf.to_container(compose_cfg("train", [f"backbone={k}_tiny"], "/tmp/unused").backbone, resolve=True)
        assert want["_target_"] == f"diffusion_lab.testing.tiny_mmdit.tiny_{k}_transformer"
        for old in ("diffusion_lab.components.tiny.", "diffusion_lab.testing.tiny."):
            assert moved_paths({**want, "_target_": f"{old}tiny_{k}_transformer"}) == want
        torch.manual_seed(0)
        assert isinstance(instantiate(want), torch.nn.Module)
