"""ControlNet runs (``controlnet=from_backbone``) -> the ControlNet folder of the family's pipeline.

    <run dir>/controlnet/config.json + diffusion_pytorch_model.safetensors

which plain diffusers loads and runs beside the base the run was trained on, e.g. for SD 1.x:

    controlnet = ControlNetModel.from_pretrained("<run dir>/controlnet")    # SD3ControlNetModel / FluxControlNetModel /
                                        # QwenImageControlNetModel / SanaControlNetModel / ZImageControlNetModel
    pipe = StableDiffusionControlNetPipeline.from_pretrained(<model.pretrained>, controlnet=controlnet)
    pipe("a prompt", image=control_image)      # PIL image (or [N, 3, H, W] in [0, 1])
    # transformer families: pipe("a prompt", control_image=control_image)  (Sana: PIL, or a tensor in [-1, 1])

The backbone, VAE and text encoders are not written: they are the (frozen) base's.
``build_controlnet_pipeline`` gives the family's ControlNet pipeline of a module in memory.
"""

from __future__ import annotations

from diffusion_lab.utils.io import atomic_dir


def is_controlnet(module) -> bool:
    return getattr(module, "controlnet", None) is not None


def build_controlnet_pipeline(module):
    """The family's ControlNet pipeline (``family.controlnet_pipeline_class``) of the module's frozen
    base and current ControlNet, its scheduler the configured sampler."""
    import diffusers

    from diffusion_lab.export.pipelines import _float32, build_pipeline

    base = build_pipeline(module, fused=True)  # the family's pipeline of the frozen parts
    cls = getattr(diffusers, module.family.controlnet_pipeline_class)
    return cls(**base.components, controlnet=_float32(module.controlnet))


def save_controlnet(module, out_dir: str) -> None:
    """Write ``out_dir`` (atomically): the ControlNet in diffusers format (float32)."""
    from diffusion_lab.components.controlnet import own_weights
    from diffusion_lab.export.pipelines import _float32

    with atomic_dir(out_dir) as tmp, own_weights(_float32(module.controlnet)) as net:  # not the transformer's parts it borrows
        net.save_pretrained(tmp, safe_serialization=True)
