"""Plan a training run's peak device memory before running it.

    python -m diffusion_lab.plan model=latent_flux plan/architecture=flux1_dev adapter=lora trainer=gpu data.resolution=1024
    python -m diffusion_lab.plan experiment=sdxl_lora plan/architecture=sdxl plan.budget_gb=24
    python -m diffusion_lab.plan experiment=flux_finetune_tiny model.pretrained=outputs/tiny_flux    # a folder's config.json files

Takes the overrides of ``diffusion_lab.train`` and prints, per rank: weights, gradients, optimizer
state, EMA, activations and frozen parts (VAE + text encoders), from the backbone built on the meta
device (``diffusion_lab/memory``); with ``plan.budget_gb`` the switches that fit it, in the order to
try them. Writes ``<run dir>/plan.json``. A budget nothing fits is a one-paragraph error (exit 2).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import diffusion_lab  # noqa: F401  (registers config resolvers)
from diffusion_lab.memory.report import plan
from diffusion_lab.utils.cli import explain_unknown_keys, friendly_errors
from diffusion_lab.utils.config_path import CONFIG_PATH


@hydra.main(config_path=CONFIG_PATH, config_name="plan", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with friendly_errors():
        plan(cfg)


if __name__ == "__main__":
    with explain_unknown_keys("plan"):
        main()
