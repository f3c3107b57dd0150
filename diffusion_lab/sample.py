"""Sample from a trained model: pixel models (any process), and text-to-image with SD / SDXL.

    python -m diffusion_lab.sample pipeline=outputs/ddpm_digits/runs/<date>/pipeline sampler=dpmpp num_inference_steps=20
    python -m diffusion_lab.sample ckpt_path=<run dir>/checkpoints/last.ckpt num_images=64
    python -m diffusion_lab.sample pipeline=<run>/pipeline prompt="a handwritten digit seven" guidance_scale=7.5
    python -m diffusion_lab.sample pipeline=<base> lora=<run>/lora lora_scale=0.8 prompts_file=prompts.txt
    python -m diffusion_lab.sample recipe=sdxl_refiner prompt="a lighthouse at dusk"      # SDXL base + refiner

Writes ``<out_dir>/000000.png ...`` (one PNG per image), ``<out_dir>/grid.png`` and, for text
prompts, ``<out_dir>/prompts.txt`` (file name and prompt per line). With no ``sampler=`` the model
samples as it was trained to (the pipeline's saved scheduler, or the checkpoint's sampler); with no
``num_inference_steps=`` it takes the step count the model was trained for (a distilled pipeline records
it in ``diffusion_lab.json``: 2), else 50; without ``guidance_scale=`` likewise (a distilled student: 1), else 7.5.
"""

from __future__ import annotations

from pathlib import Path

import hydra

import diffusion_lab  # noqa: F401  (resolvers, the typed configs)
from diffusion_lab.inference.config import SampleConfig
from diffusion_lab.inference.generate import generate_from_config, save_images
from diffusion_lab.utils.cli import explain_unknown_keys, friendly_errors
from diffusion_lab.utils.config_path import CONFIG_PATH
from diffusion_lab.utils.errors import ConfigError


def run(cfg: SampleConfig) -> Path:
    """Draw ``cfg.num_images`` images, write them (and their prompts) to ``cfg.out_dir``; return the grid."""
    if bool(cfg.pipeline) == bool(cfg.ckpt_path):
        raise ConfigError("give exactly one of pipeline=<diffusers folder or hub id> or ckpt_path=<Lightning checkpoint>.")
    images = generate_from_config(cfg)
    grid = save_images(images.images, cfg.out_dir, images.prompts)
    info = images.info
    how = f"process={info['process']}" if info["kind"] == "pixel" else f"guidance {info['guidance_scale']}"
    print(f"wrote {len(images.images)} images and {grid} ({info['scheduler']}, {info['num_inference_steps']} steps, {how})")
    return grid


@hydra.main(config_path=CONFIG_PATH, config_name="sample", version_base="1.3")
def main(cfg: SampleConfig) -> None:
    with friendly_errors():
        run(cfg)


if __name__ == "__main__":
    with explain_unknown_keys("sample"):
        main()
