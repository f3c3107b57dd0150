"""Timestep-stratified validation: val/loss_t<k> per noise-level bucket, for every process, and
the run's curves.png."""

import json
from pathlib import Path

import pytest
import torch

from diffusion_lab.metrics.stratified import LossByLevel, level_buckets
from diffusion_lab.train import train


def test_level_buckets_are_equal_width():
    levels = torch.tensor([0.0, 0.124, 0.125, 0.5, 0.999, 1.0])
    assert level_buckets(levels, 8).tolist() == [0, 0, 1, 4, 7, 7]


def test_bucket_means_weighted_by_counts_are_the_mean():
    g = torch.Generator().manual_seed(0)
    losses, levels = torch.rand(100, generator=g), torch.rand(100, generator=g)
    metric = LossByLevel(8)
    metric.update(losses[:60], levels[:60])  # two batches
    metric.update(losses[60:], levels[60:])
    means = metric.compute()
    k = level_buckets(levels, 8)
    for b in range(8):
        assert torch.isclose(means[b], losses[k == b].mean())
    assert torch.isclose((means * metric.counts).sum() / metric.counts.sum(), losses.mean())


@pytest.mark.parametrize("process", ["vp", "flow_matching", "edm"])
def test_val_loss_by_level_sums_back_to_val_loss(train_cfg, process):
    """A real validation pass for each process: the count-weighted bucket losses are val/loss."""
    cfg = train_cfg(f"process={process}", "data.val_fraction=0.2", "trainer.max_steps=2")
    _, objs = train(cfg)
    trainer, module = objs["trainer"], objs["model"]
    (result,) = trainer.validate(module, datamodule=objs["datamodule"], verbose=False)
    metric = module.val_loss_by_level
    counts = metric.counts
    assert counts.sum() == len(objs["datamodule"].val_set)
    logged = torch.tensor([result.get(f"val/loss_t{k}", 0.0) for k in range(8)])
    assert all((f"val/loss_t{k}" in result) == bool(counts[k] > 0) for k in range(8))
    assert abs(float((logged * counts).sum() / counts.sum()) - result["val/loss"]) < 1e-5
    assert (counts > 0).sum() >= 3  # the levels really spread over the schedule


def test_curves_png_and_history(train_cfg):
    cfg = train_cfg("trainer.max_steps=4", "trainer.val_check_interval=2")
    train(cfg)
    out = Path(cfg.paths.output_dir)
    assert (out / "curves.png").stat().st_size > 0
    history = json.loads((out / "curves.json").read_text())
    assert [row["step"] for row in history] == [2, 4]
    assert all("val/loss" in row and "train/loss" in row for row in history)
    assert any(key.startswith("val/loss_t") for key in history[-1])


def test_val_buckets_off(train_cfg):
    cfg = train_cfg("model.val_buckets=0", "trainer.max_steps=2")
    _, objs = train(cfg)
    assert objs["model"].val_loss_by_level is None
    assert not any(k.startswith("val/loss_t") for k in objs["trainer"].callback_metrics)
