"""Pixel DDPM end to end: train, checkpoint, resume, export, sample — real Lightning, real diffusers."""

import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from diffusion_lab.callbacks import EMACallback
from diffusion_lab.noising import run as run_noising
from diffusion_lab.sample import run as run_sample
from diffusion_lab.train import train
from tests.conftest import compose_cfg


def test_fast_dev_run(train_cfg):
    cfg = train_cfg("debug=fast")
    metric, objs = train(cfg)
    assert objs["trainer"].global_step == 1
    assert torch.isfinite(objs["trainer"].callback_metrics["train/loss"])


def test_train_logs_and_writes_pictures(train_cfg):
    cfg = train_cfg("callbacks.throughput.window_size=2")  # images/s from the second batch on
    metric, objs = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert objs["trainer"].global_step == 4
    assert metric is not None and metric > 0  # val/loss returned for sweepers
    assert (out / "config.yaml").exists()
    assert (out / "noising.png").exists() and (out / "samples" / "step_000004.png").exists()
    metrics = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/loss", "val/loss", "train/grad_norm", "train/device/samples_per_sec", "train/peak_memory_mb", "lr-AdamW"):
        assert key in metrics, key
    import pandas as pd

    rows = pd.read_csv(out / "csv" / "metrics.csv").dropna(subset=["train/samples"])  # Lightning's ThroughputMonitor
    assert rows["train/samples"].tolist() == [8.0 * k for k in range(1, 5)]  # data.batch_size=8 images per step
    assert (rows["train/device/samples_per_sec"].dropna() > 0).sum() == 3  # a rate once the window (2 batches) is full


def test_resume_continues_step_and_ema(train_cfg, tmp_path):
    cfg = train_cfg()
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["global_step"] == 4
    ema_saved = saved["callbacks"]["ema"]
    assert ema_saved["optimization_step"] == 4

    cfg2 = compose_cfg("train", [*_tiny(), "trainer.max_steps=6", f"ckpt_path={ckpt}"], tmp_path / "resumed")
    seen = {}

    class Probe(EMACallback):  # records the EMA right after restore, before any new step
        def on_train_start(self, trainer, pl_module):
            seen["step"] = trainer.global_step
            seen["shadow"] = [p.clone() for p in self.ema.shadow_params]

    from diffusion_lab import train as train_mod

    orig = train_mod.instantiate_callbacks
    train_mod.instantiate_callbacks = lambda c: [cb if not isinstance(cb, EMACallback) else Probe(**cb.kwargs) for cb in orig(c)]
    try:
        _, objs = train(cfg2)
    finally:
        train_mod.instantiate_callbacks = orig
    assert seen["step"] == 4 and objs["trainer"].global_step == 6
    for a, b in zip(seen["shadow"], ema_saved["shadow_params"]):
        torch.testing.assert_close(a, b)
    ema = next(cb for cb in objs["trainer"].callbacks if isinstance(cb, EMACallback))
    assert ema.ema.optimization_step == 6


def _tiny():
    from tests.conftest import TINY

    return TINY


def test_export_loads_in_plain_diffusers(train_cfg):
    cfg = train_cfg()
    _, objs = train(cfg)
    pipe_dir = Path(cfg.paths.output_dir) / "pipeline"
    # The export holds the EMA weights, not the raw ones.
    ema = next(cb for cb in objs["trainer"].callbacks if isinstance(cb, EMACallback))
    from diffusers import UNet2DModel

    exported = UNet2DModel.from_pretrained(pipe_dir / "unet")
    for p, s in zip(exported.parameters(), ema.ema.shadow_params):
        torch.testing.assert_close(p, s)
    # Load and run with diffusion_lab made unimportable: no project code needed.
    code = (
        "import sys; sys.modules['diffusion_lab'] = None\n"
        "from diffusers import DDPMPipeline\n"
        f"pipe = DDPMPipeline.from_pretrained({str(pipe_dir)!r})\n"
        "out = pipe(batch_size=2, num_inference_steps=3, output_type='np').images\n"
        "print(out.shape)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "(2, 16, 16, 1)" in res.stdout


def test_sample_cli_two_samplers(train_cfg, tmp_path):
    cfg = train_cfg()
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    grids = {}
    for sched in ("ddim", "dpmpp"):
        out = tmp_path / f"samples_{sched}"
        scfg = compose_cfg("sample", [f"pipeline={run_dir / 'pipeline'}", f"sampler={sched}", "num_inference_steps=4", "num_images=5", "batch_size=3", f"out_dir={out}"], out)
        grids[sched] = run_sample(scfg)
        pngs = sorted(out.glob("0*.png"))
        assert len(pngs) == 5 and Image.open(pngs[0]).size == (16, 16)
    a, b = (torch.tensor(list(Image.open(g).getdata()), dtype=torch.float) for g in grids.values())
    assert not torch.equal(a, b)  # different samplers, different images
    # from the checkpoint, and through the real command line
    out = tmp_path / "from_ckpt"
    res = subprocess.run(
        [sys.executable, "-m", "diffusion_lab.sample", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "sampler=euler", "num_inference_steps=3", "num_images=2", f"out_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "grid.png").exists() and len(list(out.glob("0*.png"))) == 2


def test_sample_cli_needs_a_source(tmp_path, capsys):
    res = subprocess.run([sys.executable, "-m", "diffusion_lab.sample", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "pipeline=" in res.stderr and "Traceback" not in res.stderr


def test_noising_strip(tmp_path):
    cfg = compose_cfg("noising", ["levels=[0,0.5,1]", "num_images=2", f"out={tmp_path / 'strip.png'}"], tmp_path)
    path = run_noising(cfg)
    im = Image.open(path)
    assert im.width == 3 * 80 and im.height == 2 * 80 + 28
    # t=0 column is the clean image, t=999 column is (almost) pure noise: compare to the data
    arr = torch.tensor(list(im.convert("L").getdata()), dtype=torch.float).view(im.height, im.width)[28:]
    clean, noisy = arr[:, :80], arr[:, 160:]
    assert clean.std() > 0 and (clean - noisy).abs().mean() > 30


def test_wandb_offline_run_is_created(train_cfg):
    cfg = train_cfg("logger=wandb", "trainer.max_steps=2")
    train(cfg)
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_flowers_recipe_runs_on_local_parquet(tmp_path):
    """experiment=ddpm_flowers as written (hf data source, lecture UNet layout, cosine warmup),
    with the UNet shrunk and a local parquet file of images swapped in for the hub data set."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(12)]
    parquet = tmp_path / "flowers" / "train-00000.parquet"
    parquet.parent.mkdir()
    datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image()).to_parquet(str(parquet))
    overrides = [
        "experiment=ddpm_flowers", "backbone=tiny", "trainer=cpu", "trainer.precision=32-true", "logger=csv",
        "data.name=null", f"data.data_files={parquet}", "data.resolution=16", "data.batch_size=4", "data.num_workers=0",
        "debug=fast",
    ]
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    assert cfg.data.datamodule.dataset._target_.endswith("HFImageDataset") and cfg.model.lr_scheduler.num_warmup_steps == 500
    _, objs = train(cfg)
    assert objs["trainer"].global_step == 1
    assert objs["datamodule"].dataset[0]["pixel_values"].shape == (3, 16, 16)
