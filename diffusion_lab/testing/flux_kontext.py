"""A tiny random ``FluxKontextPipeline``, built offline (no download).

FLUX.1 Kontext [dev] has exactly FLUX.1-dev's parts (CLIP-L pooled + T5 states, a guidance-embedding
``FluxTransformer2DModel``, the 16-channel VAE, the dynamically shifted flow-matching scheduler); only the
pipeline differs: the reference image is VAE-encoded, packed and appended to the image tokens. So the tiny
Kontext pipeline is the tiny FLUX pipeline's parts (``testing/tiny_mmdit.tiny_flux_pipeline``) in a
``FluxKontextPipeline``.

    tiny_pipeline(32).save_pretrained(DIR)     # python -m diffusion_lab.tiny_sd DIR --kind flux_kontext
"""

from __future__ import annotations


def tiny_pipeline(resolution: int = 32, seed: int = 0):
    """A ``FluxKontextPipeline`` of the tiny FLUX parts (about 2 MB). Sample it at its size with
    ``height=width=max_area**0.5`` (the pipeline rescales the target to ``max_area``, 1024^2 by default) and
    ``_auto_resize=False`` (else it resizes the reference image to one of Kontext's preferred resolutions)."""
    from diffusers import FluxKontextPipeline

    from diffusion_lab.testing.tiny_mmdit import tiny_flux_pipeline

    return FluxKontextPipeline(**tiny_flux_pipeline(resolution, seed, guidance_embeds=True).components)
