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

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict

import diffusion_lab  # noqa: F401
from diffusion_lab.inference import generate as G
from diffusion_lab.utils.cli import explain_unknown_keys, friendly_errors
from diffusion_lab.utils.config_path import CONFIG_PATH
from diffusion_lab.utils.errors import ConfigError


def run(cfg: DictConfig) -> Path:
    if bool(cfg.pipeline) == bool(cfg.ckpt_path):
        raise ConfigError("give exactly one of pipeline=<diffusers folder or hub id> or ckpt_path=<Lightning checkpoint>.")
    device = G.pick_device(cfg.device)
    module = None
    if cfg.ckpt_path:
        from diffusion_lab.inference.checkpoints import load_module

        module = load_module(cfg.ckpt_path, use_ema=cfg.use_ema, trust=cfg.trust_checkpoint)
    with open_dict(cfg):
        if cfg.num_inference_steps is None:
            cfg.num_inference_steps = int(trained_value(cfg, module, "num_inference_steps") or 50)
        if cfg.guidance_scale is None:
            cfg.guidance_scale = float(trained_value(cfg, module, "guidance_scale") or 7.5)
    pipe = G.load_text_pipeline(cfg, module)
    if pipe is not None:
        return run_text_to_image(cfg, pipe, device)
    model = G.load_pixel_model(cfg, module)
    images = model.generate(cfg.num_images, cfg.batch_size, cfg.num_inference_steps, cfg.seed, device)
    grid = G.save_images(images, cfg.out_dir)
    print(f"wrote {len(images)} images and {grid} ({model.scheduler_name}, {cfg.num_inference_steps} steps, process={model.kind})")
    return grid


def trained_value(cfg: DictConfig, module=None, key: str = "num_inference_steps"):
    """What the model was trained to sample with (``num_inference_steps`` / ``guidance_scale``): a method's
    ``sample_steps`` / ``sample_guidance`` (distillation), read from the checkpoint's method or from
    ``diffusion_lab.json`` in the pipeline or LoRA folder (``export/pipelines.py`` writes it); else None."""
    value = getattr(getattr(module, "method", None), {"num_inference_steps": "sample_steps", "guidance_scale": "sample_guidance"}[key], None)
    for folder in (cfg.pipeline, cfg.get("lora")):
        record = Path(folder) / "diffusion_lab.json" if folder else None
        if value is None and record is not None and record.is_file():
            value = json.loads(record.read_text()).get(key)
    return value


def run_text_to_image(cfg: DictConfig, pipe, device) -> Path:
    prompts = G.read_prompts(cfg)
    pipe = G.prepare_pipeline(pipe, cfg, device)
    refiner = G.load_refiner(cfg, device) if cfg.refiner else None
    images, used = G.generate_text_images(pipe, prompts, cfg, refiner)
    grid = G.save_images(images, cfg.out_dir)
    (Path(cfg.out_dir) / "prompts.txt").write_text("".join(f"{i:06d}.png\t{p}\n" for i, p in enumerate(used)))
    print(f"wrote {len(images)} images and {grid} ({type(pipe.scheduler).__name__}, {cfg.num_inference_steps} steps, guidance {cfg.guidance_scale})")
    return grid


@hydra.main(config_path=CONFIG_PATH, config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with friendly_errors():
        run(cfg)


if __name__ == "__main__":
    with explain_unknown_keys("sample"):
        main()
