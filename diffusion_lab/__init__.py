"""diffusion_lab: config-driven diffusion training (pixel DDPM and latent Stable Diffusion).

Importing the package registers the OmegaConf resolvers the configs in ``conf/`` use and filters
the libraries' known noise (``utils/quiet.py``).
"""

from diffusion_lab.utils.quiet import quiet_known_noise
from diffusion_lab.inference.config import register_configs
from diffusion_lab.utils.resolvers import register_resolvers

register_resolvers()
register_configs()
quiet_known_noise()

__version__ = "0.1.0"
