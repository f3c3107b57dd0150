from diffusion_lab.components.schedulers import build_scheduler

__all__ = ["build_scheduler"]
