"""Train a diffusion model.

    python -m diffusion_lab.train                               # pixel DDPM on digits
    python -m diffusion_lab.train experiment=ddpm_flowers       # the lecture recipe (GPU + data)
    python -m diffusion_lab.train process=flow_matching sampler=dpmpp logger=csv trainer.max_steps=200
    python -m diffusion_lab.train -m model.optimizer.lr=1e-4,3e-4   # a sweep

Seed, build data, model, callbacks, loggers, trainer; fit; the export callback writes the
pipeline. Returns ``cfg.optimized_metric`` for sweepers.
"""

from __future__ import annotations

import logging

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import diffusion_lab  # noqa: F401  (registers config resolvers)
from diffusion_lab.components.pretrained import check_hub_downloads
from diffusion_lab.utils.cli import explain_unknown_keys, friendly_errors
from diffusion_lab.utils.config_path import CONFIG_PATH
from diffusion_lab.utils.ddp_jobs import job_scope
from diffusion_lab.utils.instantiate import instantiate_callbacks, instantiate_loggers
from diffusion_lab.utils.results import optimized_metric, save_config
from diffusion_lab.utils.validate import check_callbacks_fit_model, check_checkpoint_file, check_pixel_model_fits_data, check_quantization_applies

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> tuple[float | None, dict]:
    """Run one training job; returns (optimized metric or None, objects built)."""
    check_hub_downloads(cfg)  # offline: every missing model and data set in one message, before any retry
    pl.seed_everything(cfg.seed, workers=True)
    check_quantization_applies(cfg)
    datamodule = instantiate(cfg.data.datamodule)
    model = instantiate(cfg.model)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    check_pixel_model_fits_data(model, datamodule)
    check_callbacks_fit_model(model, cfg.get("callbacks"))
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if cfg.get("ckpt_path"):
        check_checkpoint_file(cfg.ckpt_path, trainer.strategy)
    # W&B finished even on failure; under DDP each job of a sweep is its own process group
    with job_scope(trainer, loggers):
        save_config(cfg, trainer)
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metric = optimized_metric(cfg, trainer)
    return metric, {"trainer": trainer, "model": model, "datamodule": datamodule}


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    with friendly_errors():
        metric, objects = train(cfg)
    trainer = objects["trainer"]
    if trainer.is_global_zero:
        print(f"\nrun dir: {cfg.paths.output_dir}")
        for cb in trainer.callbacks:
            if getattr(cb, "last_path", None):
                print(f"samples: {cb.last_path}")
            if getattr(cb, "exported_to", None):
                print(f"exported: {cb.exported_to}")
        if metric is not None:
            print(f"{cfg.optimized_metric}: {metric:.5f}")
    return metric


if __name__ == "__main__":
    with explain_unknown_keys("train"):
        main()
