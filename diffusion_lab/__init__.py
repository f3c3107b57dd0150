"""diffusion_lab: config-driven diffusion training (pixel DDPM and latent Stable Diffusion).

Importing the package registers the OmegaConf resolvers the configs in ``conf/`` use.
"""

from diffusion_lab.utils.resolvers import register_resolvers

register_resolvers()

__version__ = "0.1.0"
