"""ControlNet training (controlnet=from_backbone on the SD family): the real experiment configs, shrunk, on a tiny SD
pipeline folder that diffusers itself wrote; the export reloads in plain diffusers and steers
StableDiffusionControlNetPipeline; control maps and the errors for missing control images."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
)
from hydra.utils import instantiate
from PIL import Image
from scipy.ndimage import binary_dilation, binary_erosion

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.testing import tiny
from diffusion_lab.data.control import (
    CONTROL_KEY,
    ControlMaps,
    control_image,
    control_map,
)
from diffusion_lab.data.digits import DigitsDataset
from diffusion_lab.data.transforms import ImageTransform
from diffusion_lab.export import build_controlnet_pipeline
from diffusion_lab.components.controlnet import controlnet_from_backbone
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError, DataError
from tests.conftest import compose_cfg
from tests.test_latent import user_error

FAST = [
    "experiment=controlnet_tiny",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "data.batch_size=4",
    "model.preview_steps=2",
    "callbacks.sample_grid.every_n_steps=3",
    "callbacks.sample_grid.num_images=2",
    "callbacks.model_checkpoint.every_n_train_steps=3",
]


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """A tiny SD pipeline folder written by ``StableDiffusionPipeline.save_pretrained`` alone."""
    out = tmp_path_factory.mktemp("diffusers") / "sd"
    tiny.tiny_sd_pipeline(resolution=32).save_pretrained(out)
    return str(out)


def fit(out, *overrides):
    cfg = compose_cfg("train", FAST + list(overrides), out)
    _, objects = train(cfg)
    return objects


@pytest.fixture(scope="module")
def run(diffusers_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("controlnet") / "run"
    objects = fit(out, f"model.pretrained={diffusers_folder}", "model.optimizer.lr=1e-2")
    return out, objects


def _digit_control(i: int = 0, kind: str = "edges") -> Image.Image:
    x = DigitsDataset(ImageTransform(32, mode="RGB", warn_upscale=False))[i]["pixel_values"]
    return Image.fromarray((control_image(x, kind)[0].numpy() > 0).astype(np.uint8) * 255).convert("RGB")


def _sample(pipe, control, prompt="a handwritten digit seven", **kw):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, image=control, num_inference_steps=3, height=32, width=32, output_type="np", generator=g, **kw).images


def test_only_the_controlnet_trains_and_the_export_steers_plain_diffusers(run, diffusers_folder):
    out, objects = run
    module = objects["model"]
    base = StableDiffusionPipeline.from_pretrained(diffusers_folder)
    for name, p in base.unet.state_dict().items():  # the UNet is frozen: bit-identical after training
        torch.testing.assert_close(module.base_backbone.state_dict()[name], p, rtol=0, atol=0)
    assert {n.split(".")[0] for n, p in module.named_parameters() if p.requires_grad} == {"controlnet"}

    controlnet = ControlNetModel.from_pretrained(out / "controlnet")
    with ema_weights(objects["trainer"], module):  # what was trained (its EMA) is what was written
        for name, p in module.controlnet.state_dict().items():
            torch.testing.assert_close(controlnet.state_dict()[name], p, rtol=0, atol=0)
    trained = StableDiffusionControlNetPipeline.from_pretrained(diffusers_folder, controlnet=controlnet, safety_checker=None)
    zero = StableDiffusionControlNetPipeline.from_pretrained(diffusers_folder, controlnet=ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32)), safety_checker=None)
    control = _digit_control()
    plain = base("a handwritten digit seven", num_inference_steps=3, height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(_sample(zero, control), plain, atol=1e-5)  # zero convolutions: no effect at init
    with_control = _sample(trained, control)
    assert np.abs(with_control - plain).max() > 1e-2  # the trained ControlNet changes the output ...
    # ... and follows the control (after 3 steps the control path has only begun to train: small, but
    # far above zero, which is what the same pipeline gives for the same control on CPU)
    assert np.abs(with_control - _sample(trained, _digit_control(5))).max() > 1e-5
    np.testing.assert_allclose(_sample(trained, control, controlnet_conditioning_scale=0.0), plain, atol=1e-5)
    with ema_weights(objects["trainer"], module):  # the in-memory pipeline of the module is the exported one
        np.testing.assert_allclose(_sample(build_controlnet_pipeline(module), control), with_control, atol=1e-5)


def test_computed_controls_reach_batches_and_previews(run):
    out, objects = run
    module, dm = objects["model"], objects["datamodule"]
    item, image = dm.train_set[0], dm.train_set[0]["pixel_values"]
    torch.testing.assert_close(item[CONTROL_KEY], control_image(image, "edges"))  # data.control=edges, from the image itself
    assert (out / "samples" / "step_000003.png").exists()
    noise = torch.randn(module.latent_shape(2), generator=torch.Generator().manual_seed(0))
    a = module.generate(2, num_inference_steps=2, noise=noise)  # previews: the first training controls
    other = {CONTROL_KEY: -torch.ones(2, 3, 32, 32), "caption": module._preview["caption"][:2]}  # a blank control
    b = module.generate(2, num_inference_steps=2, noise=noise, cond_batch=other)
    assert (a - b).abs().max() > 1e-3


def test_control_maps_of_a_digit():
    x = DigitsDataset(ImageTransform(16, mode="RGB", warn_upscale=False))[0]["pixel_values"]
    grey = (x.mean(0).numpy() + 1) / 2
    mask, strokes, edges = (control_map(grey, k) for k in ("mask", "strokes", "edges"))
    assert 0 < strokes.sum() < mask.sum() < grey.size / 2  # ink is the minority; its skeleton thinner
    assert (strokes & ~mask).sum() == 0  # the skeleton lies inside the ink
    near, inside = binary_dilation(mask), binary_erosion(mask)  # outlines: at the ink's border, not inside it
    assert edges.sum() > 0 and (edges & near).sum() >= 0.9 * edges.sum() and (edges & inside).sum() <= 0.1 * edges.sum()
    c = control_image(x, "strokes")
    assert c.shape == x.shape and set(torch.unique(c).tolist()) == {-1.0, 1.0}
    wrapped = ControlMaps(DigitsDataset(ImageTransform(16, mode="L", warn_upscale=False)), "edges")
    assert wrapped[3][CONTROL_KEY].shape == (1, 16, 16) and wrapped[3]["label"] == 3


def test_bad_settings_are_config_errors(diffusers_folder, tmp_path):
    unet = StableDiffusionPipeline.from_pretrained(diffusers_folder).unet
    with pytest.raises(ConfigError, match="conditioning_embedding_out_channels"):
        controlnet_from_backbone(unet, downsample_factor=2, conditioning_embedding_out_channels=(16, 32, 96, 256))
    for override, match, part in (("adapter=lora", "adapter=none", "model"), ("data.control=sobel", "data.control='sobel'", "data"), ("text_encoder.trainable=true", "trainable=false", "model")):
        cfg = compose_cfg("train", FAST + [f"model.pretrained={diffusers_folder}", override], tmp_path / "run")
        with pytest.raises(Exception) as e:  # hydra's InstantiationException around it
            instantiate(cfg.model if part == "model" else cfg.data.datamodule)
        assert isinstance(user_error(e), ConfigError) and match in str(user_error(e))


def _paired_folder(root, n=8):
    root.mkdir(parents=True)
    ds = DigitsDataset(ImageTransform(32, mode="RGB", warn_upscale=False))
    rows = []
    for i in range(n):
        x = ds[i]["pixel_values"]
        Image.fromarray(((x.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)).save(root / f"{i}.png")
        (root / "control").mkdir(exist_ok=True)
        Image.fromarray(((control_image(x, "strokes")[0].numpy() + 1) * 127.5).astype(np.uint8)).save(root / "control" / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "conditioning_image": f"control/{i}.png", "text": ds.caption(int(ds.labels[i]))})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["data=image_folder", f"data.root={root}", "data.resolution=32", "data.control=null", "data.num_workers=0", "data.val_fraction=0",
            f"data.paired_images={{conditioning_image: {CONTROL_KEY}}}"]


def test_conditioning_image_column_trains_and_a_missing_file_is_named(diffusers_folder, tmp_path):
    data = _paired_folder(tmp_path / "images")
    objects = fit(tmp_path / "run", f"model.pretrained={diffusers_folder}", *data, "trainer.max_steps=1", "callbacks.sample_grid=null", "model.cache=true")
    assert objects["trainer"].global_step == 1 and (tmp_path / "run" / "controlnet" / "config.json").exists()
    dm = objects["datamodule"]  # model.cache=true: the cache carries each image's conditioning image
    cached, loaded = dm.train_set[5], dm.dataset[5]
    assert "latent_moments" in cached and "pixel_values" not in cached
    torch.testing.assert_close(cached[CONTROL_KEY], loaded[CONTROL_KEY])
    (tmp_path / "images" / "control" / "5.png").unlink()
    with pytest.raises(Exception) as e:  # raised when the data set is built, before training
        fit(tmp_path / "run2", f"model.pretrained={diffusers_folder}", *data, "trainer.max_steps=1")
    error = user_error(e)
    assert isinstance(error, DataError) and str(tmp_path / "images" / "control" / "5.png") in str(error) and "\n" not in str(error)


def test_batches_without_control_images_are_a_data_error(diffusers_folder, tmp_path):
    with pytest.raises(DataError, match="data.control=edges"):
        fit(tmp_path / "run", f"model.pretrained={diffusers_folder}", "data.control=null", "trainer.max_steps=1")

