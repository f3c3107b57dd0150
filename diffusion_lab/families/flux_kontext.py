"""FLUX.1 Kontext [dev] (Black Forest Labs 2025): in-context image editing with FLUX.1's parts.

The transformer, text encoders (CLIP pooled + T5 states: ``FluxTextConditioner``), VAE and scheduler are
FLUX.1-dev's; what differs is the reference image. ``FluxKontextPipeline`` VAE-encodes it (the posterior
mode, ``_encode_vae_image``), packs it into 2x2 tokens like the latents, and appends those tokens to the image
tokens, with position ids whose first coordinate is 1 instead of 0 (``prepare_latents``); the transformer's
prediction keeps only the target tokens (``noise_pred[:, : latents.size(1)]``). The resolution shift ``mu``
counts the target tokens only.

Training pairs: the training image is the edit's target; its source (reference) image is the batch key
``source_key`` (``source_pixel_values`` ``[N, C, H, W]`` in [-1, 1]), which ``data=image_folder`` loads with
``data.paired_images='{source_image: source_pixel_values}'`` (a metadata column naming each source file, the
mechanism ControlNet's ``conditioning_image`` uses). Exports a ``FluxKontextPipeline``; sample it with
``image=<source>``.
"""

from __future__ import annotations

import torch

from diffusion_lab.families.flux import Flux, image_ids, pack

SOURCE_KEY = "source_pixel_values"


class FluxKontext(Flux):
    """FLUX.1 trained to edit: ``conditioning`` encodes the source image into reference latents, ``forward``
    appends them to the packed latents as ``FluxKontextPipeline`` does.

    Args:
        guidance, sample_guidance: the embedded guidance while training / in previews (FLUX.1 Kontext [dev]:
            ``FluxKontextPipeline``'s ``guidance_scale`` default 3.5; diffusers' Kontext LoRA script trains at 1.0).
        source_key: the batch key of the source images (``conditioning_pixel_values`` reads ``data.control``'s
            computed maps instead, for the offline digits recipe).
    """

    name = "latent_flux_kontext"
    pipeline_class = "FluxKontextPipeline"
    controlnet_pipeline_class = None  # diffusers has no Kontext ControlNet pipeline
    edits = True  # trains on edit pairs: a source image per example (Family.supports("edit"))
    refuses = {"dreambooth": "DreamBooth's instance and class images have no source image to edit."}

    def __init__(self, guidance: float = 3.5, sample_guidance: float = 3.5, source_key: str = SOURCE_KEY, preview_sources: int = 16) -> None:
        super().__init__(guidance, sample_guidance)
        self.source_key = source_key
        self.cached_batch_keys = (source_key,)  # the latent cache carries the sources along
        self.preview_sources = preview_sources
        self._previews: torch.Tensor | None = None

    def conditioning(self, module, batch: dict | None, n: int, sampling: bool) -> dict[str, torch.Tensor]:
        """FLUX.1's embedded guidance plus ``reference_latents`` ``[n, c, h, w]``: the source images through the
        codec's posterior mode, ``(z - shift) * scale`` (``FluxKontextPipeline._encode_vae_image``, argmax).
        Sampling without sources (the sample grids give prompts only) cycles through the first
        ``preview_sources`` training sources."""
        cond = super().conditioning(module, batch, n, sampling)
        source = self.edit_sources(module, batch, n, sampling)
        cond["reference_latents"] = module.codec.encode(source.to(module.device, torch.float32), sample=False)
        return cond

    def forward(self, backbone, x_t: torch.Tensor, t: torch.Tensor, reference_latents: torch.Tensor | None = None, **cond) -> torch.Tensor:
        """FLUX.1's call (``Flux.forward``) with the packed reference tokens appended to the image tokens and
        their ids (first coordinate 1) to ``img_ids``; the prediction of the target tokens only."""
        if reference_latents is None:
            return super().forward(backbone, x_t, t, **cond)
        reference = pack(reference_latents.to(x_t.dtype))
        reference_ids = image_ids(*reference_latents.shape[-2:], x_t.device, x_t.dtype, first=1.0)

        def with_reference(hidden_states, img_ids, **kwargs):
            out = backbone(hidden_states=torch.cat([hidden_states, reference], dim=1), img_ids=torch.cat([img_ids, reference_ids]), **kwargs)
            out.sample = out.sample[:, : hidden_states.shape[1]]
            return out

        return super().forward(with_reference, x_t, t, **cond)
