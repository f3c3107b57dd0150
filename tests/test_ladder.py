"""The reference-run ladder: the CIFAR-10 GPU recipes compose and run a step on tiny overrides (a
local image folder and a parquet file); the digits CPU tier composes, runs a step, and (slow suite)
trains each process as committed and lands in the band measured in experiments/ladder."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.diffusion.sampling import load_sampler
from diffusion_lab.train import train
from tests.conftest import compose_cfg

CIFAR = ("cifar10_ddpm", "cifar10_edm", "cifar10_rectified_flow")
DIGITS = ("vp", "flow_matching", "edm")
# one training step on CPU: the recipes' UNet layout (4 levels, attention at 16 px) at width 16
TINY_CIFAR = [
    "trainer=cpu",
    "trainer.precision=32-true",
    "logger=csv",
    "debug=fast",
    "data.batch_size=4",
    "data.num_workers=0",
    "backbone.block_out_channels=[16,16,16,16]",
    "backbone.layers_per_block=1",
    "backbone.norm_num_groups=8",
    "model.preview_steps=2",
    "callbacks.sample_grid.num_images=2",
    "callbacks.progress_bar=null",
]


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory):
    """20 random 32 px RGB images as a folder of PNGs and as a parquet file laid out like the Hub's
    `cifar10` (an `img` image column)."""
    from datasets import Dataset, Image as ImageFeature

    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(20)]
    folder = root / "train"
    folder.mkdir()
    for i, im in enumerate(images):
        im.save(folder / f"{i:05d}.png")
    parquet = root / "train-00000-of-00001.parquet"
    Dataset.from_dict({"img": images, "label": list(range(20))}, features=None).cast_column("img", ImageFeature()).to_parquet(str(parquet))
    return {"folder": folder, "parquet": parquet}


@pytest.mark.parametrize("name", CIFAR)
def test_cifar10_recipe_composes_with_the_published_setup(name, tmp_path):
    cfg = compose_cfg("train", [f"experiment={name}", "data.root=/data/cifar10/train"], tmp_path)
    header = (Path(__file__).resolve().parents[1] / "conf" / "experiment" / f"{name}.yaml").read_text()
    published = {"cifar10_ddpm": "FID 3.17", "cifar10_edm": "FID 1.97 at 35 NFE", "cifar10_rectified_flow": "FID 2.58"}[name]
    assert f"PUBLISHED: {published}" in header
    assert cfg.data.resolution == 32 and cfg.data.channels == 3 and cfg.trainer.accelerator == "gpu"
    unet = instantiate(cfg.model.backbone)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    if name == "cifar10_ddpm":  # Ho et al.'s 35.7M, 800k steps of 128, 1000 ancestral steps
        assert round(params, 1) == 35.7 and cfg.trainer.max_steps == 800_000 and cfg.data.batch_size == 128
        assert cfg.sampler.name == "ddpm" and cfg.model.preview_steps == 1000
    elif name == "cifar10_edm":  # DDPM++ size (55.7M in the paper), 200 Mimg of 512, 35 NFE
        assert 54 < params < 60 and cfg.trainer.max_steps * cfg.data.batch_size == 200_000_000
        assert cfg.process._target_.endswith("EDMProcess") and cfg.model.preview_steps == 35
    else:
        assert cfg.process._target_.endswith("FlowMatchingProcess") and cfg.process.density == "uniform"


@pytest.mark.parametrize("name", CIFAR)
def test_cifar10_recipe_runs_a_step_on_a_local_folder(name, cifar_like, tmp_path):
    cfg = compose_cfg("train", [f"experiment={name}", f"data.root={cifar_like['folder']}", *TINY_CIFAR], tmp_path / "run")
    _, objs = train(cfg)
    assert objs["trainer"].global_step == 1
    assert torch.isfinite(objs["trainer"].callback_metrics["train/loss"])
    assert (Path(cfg.paths.output_dir) / "pipeline" / "model_index.json").exists()


def test_cifar10_recipe_reads_parquet(cifar_like, tmp_path):
    overrides = ["experiment=cifar10_ddpm", "data=hf", f"data.data_files={cifar_like['parquet']}", "data.image_column=img", *TINY_CIFAR]
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    assert cfg.data.batch_size == 4 and cfg.data.resolution == 32
    _, objs = train(cfg)
    assert objs["trainer"].global_step == 1


@pytest.mark.parametrize("process", DIGITS)
def test_digits_tier_composes_and_runs_a_step(process, tmp_path):
    cfg = compose_cfg("train", [f"experiment=ladder_digits_{process}", "debug=fast", "data.batch_size=8", "callbacks.sample_grid.num_images=2", "model.preview_steps=2"], tmp_path / "run")
    lo, hi = cfg.ladder.fid
    assert lo is not None and lo < hi and cfg.ladder.confidence[0] < cfg.ladder.confidence[1] <= 1
    assert cfg.process._target_.split(".")[-1] == {"vp": "VPProcess", "flow_matching": "FlowMatchingProcess", "edm": "EDMProcess"}[process]
    _, objs = train(cfg)
    assert objs["trainer"].global_step == 1


@pytest.mark.slow
@pytest.mark.parametrize("process", DIGITS)
def test_digits_tier_lands_in_its_band(process, tmp_path):
    """The config as committed (700 steps, one thread: ~5 CPU minutes) then 500 samples from the EMA
    weights: FID (digit features) and classifier confidence inside the measured band."""
    from diffusion_lab.metrics.digit_quality import digit_quality

    cfg = compose_cfg("train", [f"experiment=ladder_digits_{process}", "callbacks.progress_bar=null"], tmp_path / "run")
    _, objs = train(cfg)
    assert objs["trainer"].global_step == cfg.trainer.max_steps
    lad = cfg.ladder
    with ema_weights(objs["trainer"], objs["model"]):
        found, _ = digit_quality(objs["model"], lad.num_images, lad.num_inference_steps, load_sampler(lad.sampler), lad.seed)
    assert lad.fid[0] <= found["fid"] <= lad.fid[1], found
    assert lad.confidence[0] <= found["confidence"] <= lad.confidence[1], found
