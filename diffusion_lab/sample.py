"""Sample from a trained model.

    python -m diffusion_lab.sample pipeline=outputs/ddpm_digits/runs/<date>/pipeline scheduler=ddim num_inference_steps=50
    python -m diffusion_lab.sample ckpt_path=<run dir>/checkpoints/last.ckpt num_images=64

Writes ``<out_dir>/000000.png ...`` (one PNG per image) and ``<out_dir>/grid.png``.
"""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

import diffusion_lab  # noqa: F401
from diffusion_lab.components.schedulers import scheduler_class
from diffusion_lab.data.transforms import to_pil
from diffusion_lab.diffusion.sampling import sample
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.run import friendly_errors
from diffusion_lab.viz import image_grid


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_unet_and_scheduler(cfg: DictConfig, device: torch.device):
    """(unet, scheduler config) from a pipeline folder or a training checkpoint."""
    if cfg.pipeline:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(cfg.pipeline, local_files_only=cfg.local_files_only)
        return pipe.unet.to(device).eval(), pipe.scheduler.config
    from diffusion_lab.checkpoints import load_module

    module = load_module(cfg.ckpt_path, use_ema=cfg.use_ema)
    return module.base_unet.to(device).eval(), module.noise_scheduler.config


def generate_pixel_images(unet, scheduler, num_images: int, batch_size: int, num_inference_steps: int, seed: int, device) -> torch.Tensor:
    """``[num_images, C, H, W]`` in [-1, 1], drawn in batches with one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
    out = []
    n_batches = math.ceil(num_images / batch_size)
    for b in tqdm(range(n_batches), desc="batches", disable=n_batches == 1):
        n = min(batch_size, num_images - b * batch_size)
        cond = {}
        if unet.config.num_class_embeds:
            cond = {"class_labels": (torch.arange(n) + b * batch_size).remainder(unet.config.num_class_embeds).to(device)}
        x = sample(
            lambda x, t, **c: unet(x, t, **c).sample,
            scheduler,
            (n, unet.config.in_channels, size, size),
            num_inference_steps,
            generator=g,
            device=device,
            cond=cond,
            progress=True,
        )
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


def save_images(images: torch.Tensor, out_dir: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(to_pil(images)):
        im.save(out / f"{i:06d}.png")
    grid = out / "grid.png"
    image_grid(images).save(grid)
    return grid


def run(cfg: DictConfig) -> Path:
    if bool(cfg.pipeline) == bool(cfg.ckpt_path):
        raise ConfigError("give exactly one of pipeline=<diffusers folder or hub id> or ckpt_path=<Lightning checkpoint>.")
    device = pick_device(cfg.device)
    unet, scheduler_config = load_unet_and_scheduler(cfg, device)
    cls = scheduler_class(cfg.scheduler.class_name) if cfg.get("scheduler") else scheduler_class(scheduler_config["_class_name"])
    scheduler = cls.from_config(scheduler_config)  # a fresh scheduler: they hold state
    images = generate_pixel_images(unet, scheduler, cfg.num_images, cfg.batch_size, cfg.num_inference_steps, cfg.seed, device)
    grid = save_images(images, cfg.out_dir)
    print(f"wrote {len(images)} images and {grid} ({cls.__name__}, {cfg.num_inference_steps} steps)")
    return grid


@hydra.main(config_path="../conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with friendly_errors():
        run(cfg)


if __name__ == "__main__":
    main()
