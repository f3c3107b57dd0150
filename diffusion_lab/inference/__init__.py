"""Inference: load what training wrote (a pipeline folder or a checkpoint), pick its sampler,
draw images. ``diffusion_lab.sample``, ``diffusion_lab.evaluate`` and ``experiments/`` use this."""

from diffusion_lab.inference.checkpoints import load_module
from diffusion_lab.inference.generate import (
    PixelModel,
    generate_text_images,
    load_pixel_model,
    load_text_pipeline,
    pick_device,
    prepare_pipeline,
    read_prompts,
    save_images,
)

__all__ = [
    "PixelModel",
    "generate_text_images",
    "load_module",
    "load_pixel_model",
    "load_text_pipeline",
    "pick_device",
    "prepare_pipeline",
    "read_prompts",
    "save_images",
]
