from diffusion_lab.modules.diffusion_module import DiffusionModule
from diffusion_lab.modules.latent import LatentDiffusion
from diffusion_lab.modules.sdxl import LatentDiffusionXL

__all__ = ["DiffusionModule", "LatentDiffusion", "LatentDiffusionXL"]
