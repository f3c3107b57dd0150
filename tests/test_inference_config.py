"""The typed configs of ``sample`` / ``evaluate`` (inference/config.py) and their one generation
helper: a misspelled key or a wrong type is refused naming the key; both commands draw the same
images for the same settings (inference/generate.py's generate_images)."""

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from PIL import Image

from diffusion_lab.evaluate import run as run_evaluate
from diffusion_lab.inference.config import EvaluateConfig, SampleConfig
from diffusion_lab.sample import run as run_sample
from tests.conftest import compose_cfg


def _refusal(config_name: str, override: str, tmp_path) -> str:
    """The message (with its cause: Hydra prints both) of composing ``config_name`` with ``override``."""
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(config_name, [override], tmp_path)
    return f"{e.value} {e.value.__cause__}"


@pytest.mark.parametrize("config_name", ["sample", "evaluate"])
def test_the_yaml_is_typed_by_its_schema(config_name, tmp_path):
    cfg = compose_cfg(config_name, [], tmp_path)
    assert OmegaConf.get_type(cfg) is {"sample": SampleConfig, "evaluate": EvaluateConfig}[config_name]
    assert isinstance(cfg.num_images, int) and cfg.sampler is None and cfg.memory.cpu_offload is False
    assert cfg.num_images == {"sample": 16, "evaluate": 1000}[config_name]  # evaluate.yaml's values win over sample.yaml's


@pytest.mark.parametrize("config_name", ["sample", "evaluate"])
def test_an_unknown_key_is_refused_naming_it(config_name, tmp_path):
    assert "'num_image'" in _refusal(config_name, "num_image=4", tmp_path)
    assert "'memory.vae_slicng'" in _refusal(config_name, "memory.vae_slicng=true", tmp_path)


@pytest.mark.parametrize(
    "config_name, override, key, kind",
    [("sample", "num_images=four", "num_images", "could not be converted to Integer"),
     ("sample", "guidance_scale=high", "guidance_scale", "could not be converted to Float"),
     ("sample", "memory.cpu_offload=maybe", "memory.cpu_offload", "is not a valid bool"),
     ("evaluate", "kid_subsets=1.5", "kid_subsets", "could not be converted to Integer")],
)  # fmt: skip
def test_a_wrong_type_is_refused_naming_the_key(config_name, override, key, kind, tmp_path):
    message = _refusal(config_name, override, tmp_path)
    assert f"full_key: {key}" in message and kind in message


def test_the_values_the_yaml_leaves_unset_are_missing_not_guessed(tmp_path):
    """The schema holds types only: a value comes from conf/*.yaml or the command line."""
    cfg = OmegaConf.structured(SampleConfig)
    assert OmegaConf.is_missing(cfg, "num_images") and OmegaConf.is_missing(cfg.memory, "vae_tiling")
    assert compose_cfg("sample", ["prompt=[a cat, a dog]"], tmp_path).prompt == ["a cat", "a dog"]  # str or list: Any


@pytest.fixture(scope="module")
def pixel_pipeline(tmp_path_factory):
    """A random class-conditional tiny DDPM pipeline (8 px, 1 channel): what is drawn, not how well."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=10)  # fmt: skip
    out = tmp_path_factory.mktemp("pixel") / "pipeline"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(out)
    return out


def _pngs(folder) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("0*.png"))]


def _sample_and_evaluate(tmp_path, source: list[str], seed: int = 7, evaluate_seed: int | None = None) -> tuple[list, list, dict]:
    common = ["device=cpu", "num_images=3", "batch_size=2", "num_inference_steps=2", *source]
    run_sample(compose_cfg("sample", [*common, f"seed={seed}", f"out_dir={tmp_path / 's'}"], tmp_path / "s"))
    result = run_evaluate(compose_cfg("evaluate", [*common, f"seed={evaluate_seed if evaluate_seed is not None else seed}", "logger=none",
                                                   "num_reference=30", "kid_subsets=2", f"out_dir={tmp_path / 'e'}"], tmp_path / "e"))  # fmt: skip
    return _pngs(tmp_path / "s"), _pngs(tmp_path / "e" / "samples"), result


def test_sample_and_evaluate_draw_the_same_pixel_images(pixel_pipeline, tmp_path):
    sampled, evaluated, result = _sample_and_evaluate(tmp_path / "same", [f"pipeline={pixel_pipeline}", "sampler=ddim"])
    assert len(sampled) == len(evaluated) == 3
    assert all(np.array_equal(a, b) for a, b in zip(sampled, evaluated))
    assert result["generated"]["seed"] == 7 and result["generated"]["scheduler"] == "DDIMScheduler"
    # the comparison can fail: another seed draws other images
    _, other, _ = _sample_and_evaluate(tmp_path / "other", [f"pipeline={pixel_pipeline}", "sampler=ddim"], evaluate_seed=8)
    assert not any(np.array_equal(a, b) for a, b in zip(sampled, other))


def test_sample_and_evaluate_draw_the_same_text_to_image_images(tmp_path):
    from diffusion_lab.testing import tiny

    sd = tiny.build(tmp_path / "sd")
    prompts = ["prompt=[a handwritten digit one, a handwritten digit two]", "guidance_scale=3.0", "negative_prompt=blurry"]
    sampled, evaluated, result = _sample_and_evaluate(tmp_path, [f"pipeline={sd}", *prompts])
    assert len(sampled) == 3 and all(np.array_equal(a, b) for a, b in zip(sampled, evaluated))
    assert (tmp_path / "s" / "prompts.txt").read_text() == (tmp_path / "e" / "samples" / "prompts.txt").read_text()
    assert result["generated"]["guidance_scale"] == 3.0 and result["resolution"] == 32
