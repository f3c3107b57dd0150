"""ControlNet runs (``model=latent_controlnet``) -> a ``ControlNetModel`` folder.

    <run dir>/controlnet/config.json + diffusion_pytorch_model.safetensors

which plain diffusers loads and runs beside the base the run was trained on:

    controlnet = ControlNetModel.from_pretrained("<run dir>/controlnet")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(<model.pretrained>, controlnet=controlnet)
    pipe("a prompt", image=control_image)      # PIL image (or [N, 3, H, W] in [0, 1])

The UNet, VAE and text encoder are not written: they are the (frozen) base's.
``build_controlnet_pipeline`` gives that pipeline of a module in memory.
"""

from __future__ import annotations

from diffusion_lab.utils.io import atomic_dir


def is_controlnet(module) -> bool:
    from diffusion_lab.modules.controlnet import ControlNetDiffusion

    return isinstance(module, ControlNetDiffusion)


def build_controlnet_pipeline(module):
    """A ``StableDiffusionControlNetPipeline`` of the module's frozen base and current ControlNet,
    its scheduler the configured sampler."""
    from diffusers import StableDiffusionControlNetPipeline

    from diffusion_lab.export.pipelines import _float32, build_pipeline

    base = build_pipeline(module, fused=True)  # the StableDiffusionPipeline of the frozen parts
    parts = {k: getattr(base, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor")}
    return StableDiffusionControlNetPipeline(**parts, controlnet=_float32(module.controlnet), requires_safety_checker=base.safety_checker is not None)


def save_controlnet(module, out_dir: str) -> None:
    """Write ``out_dir`` (atomically): the ControlNet in diffusers format (float32)."""
    from diffusion_lab.export.pipelines import _float32

    with atomic_dir(out_dir) as tmp:
        _float32(module.controlnet).save_pretrained(tmp, safe_serialization=True)
