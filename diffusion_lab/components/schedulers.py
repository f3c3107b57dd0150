"""Scheduler construction: any diffusers scheduler class from one shared noise-schedule config."""

from __future__ import annotations

from hydra.utils import get_class

from diffusion_lab.utils.errors import ConfigError

# short names accepted by the sample CLI and docs
SCHEDULERS = {
    "ddpm": "diffusers.DDPMScheduler",
    "ddim": "diffusers.DDIMScheduler",
    "dpmpp": "diffusers.DPMSolverMultistepScheduler",
    "euler": "diffusers.EulerDiscreteScheduler",
    "heun": "diffusers.HeunDiscreteScheduler",
    "pndm": "diffusers.PNDMScheduler",
}


def scheduler_class(name: str):
    """``ddim`` or ``diffusers.DDIMScheduler`` -> the class."""
    path = SCHEDULERS.get(name, name)
    try:
        return get_class(path)
    except Exception as e:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)} or give a diffusers class path.") from e


def build_scheduler(class_name: str, **config):
    """``cls.from_config(config)``: keys a class does not use are ignored (a DPM-Solver does not
    take ``clip_sample``), so every sampler shares the one noise-schedule config."""
    return scheduler_class(class_name).from_config(config)
