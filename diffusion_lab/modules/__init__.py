from diffusion_lab.modules.diffusion_module import DiffusionModule
from diffusion_lab.modules.latent import LatentDiffusion

__all__ = ["DiffusionModule", "LatentDiffusion"]
