from diffusion_lab.modules.diffusion_module import DiffusionModule
from diffusion_lab.modules.latent import LatentDiffusion
from diffusion_lab.modules.controlnet import ControlNetDiffusion
from diffusion_lab.modules.dreambooth import DreamBooth
from diffusion_lab.modules.textual_inversion import TextualInversion

__all__ = ["ControlNetDiffusion", "DiffusionModule", "DreamBooth", "LatentDiffusion", "TextualInversion"]
