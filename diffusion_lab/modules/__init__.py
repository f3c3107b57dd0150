from diffusion_lab.modules.diffusion_module import DiffusionModule
from diffusion_lab.modules.latent import LatentDiffusion
from diffusion_lab.modules.textual_inversion import TextualInversion


__all__ = ["DiffusionModule", "LatentDiffusion", "TextualInversion"]
