"""Checks every family's tests make of a full fine-tune's export (tests/test_family_*.py)."""

from __future__ import annotations

import numpy as np
import torch


def tiny_folders(root):
    """``get(kind)`` -> the tiny pipeline folder of ``kind`` under ``root`` (``tiny_sd --kind``), built on first use."""
    from diffusion_lab.testing import tiny

    built = {}

    def get(kind: str) -> str:
        if kind not in built:
            built[kind] = str(tiny.build(root / kind, kind=kind))
        return built[kind]

    return get


def assert_exported_like_the_module(pipe, base, generate, own: np.ndarray, frozen=("text_encoder", "vae"), atol: float = 1e-5) -> None:
    """The exported pipeline's backbone trained, its frozen parts are the base's, and it samples what the
    module's own sampler does (``own``) and not what the base does."""
    backbone = "transformer" if hasattr(pipe, "transformer") else "unet"
    assert any(not torch.equal(a, b) for a, b in zip(getattr(pipe, backbone).parameters(), getattr(base, backbone).parameters()))
    for name in frozen:  # frozen parts exported unchanged
        assert all(torch.equal(a, b) for a, b in zip(getattr(pipe, name).parameters(), getattr(base, name).parameters())), name
    image = generate(pipe)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all() and np.abs(image - generate(base)).max() > 1e-3
    np.testing.assert_allclose(image, own, atol=atol)


# ---- ControlNet exports (tests/test_family_controlnet.py) ----------------------------------------------------
CONTROL_PROMPT = "a handwritten digit seven"
# each family's ControlNet pipeline call beyond the prompt, the control and the latents: its tiny recipe's text length,
# its guidance (the module is given the same number: Family.guide is the pipeline's rule) and a conditioning scale of 1
CONTROL_CALLS = {
    "qwen_image": dict(max_sequence_length=32),  # no negative prompt: no true CFG (its CFG reuses the positive residuals)
    "sana": dict(max_sequence_length=32, guidance_scale=4.5, use_resolution_binning=False),
    "z_image": dict(max_sequence_length=32, guidance_scale=3.0, controlnet_conditioning_scale=1.0),  # the pipeline's default is 0.75
}


def control_image(resolution: int = 32, seed: int = 3):
    """A random black-and-white RGB control: (PIL image, the same as ``[1, 3, H, W]`` in [-1, 1])."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(1, 3, resolution, resolution, generator=g) > 0.5).float() * 2 - 1
    return Image.fromarray(((x[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)), x


def _pipeline_control(kind: str, module, pipe, x: torch.Tensor, generator: torch.Generator):
    """The control latents the family's ControlNet pipeline computes from ``x`` when they are not the module's:
    QwenImageControlNetPipeline samples the control image's posterior with the call's generator (the module reads
    its mean, checked against the pipeline's own arithmetic at ``sample_mode="argmax"``); else None."""
    if kind != "qwen_image":
        return None
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_controlnet import retrieve_latents

    from diffusion_lab.families.qwen_image import pack

    c = pipe.vae.config
    mean, inv_std = torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1), 1.0 / torch.tensor(c.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        mode = retrieve_latents(pipe.vae.encode(x[:, :, None]), sample_mode="argmax")
        torch.testing.assert_close(module.family.control_input(module, x), pack(((mode - mean) * inv_std)[:, :, 0]), rtol=0, atol=1e-6)
        return pack(((retrieve_latents(pipe.vae.encode(x[:, :, None]), generator=generator) - mean) * inv_std)[:, :, 0])


def assert_controlnet_samples_like_the_module(kind: str, module, pipe, base, steps: int = 3, atol: float = 1e-5, steers: float = 1e-3) -> None:
    """``pipe`` (the family's ControlNet pipeline of an exported ControlNet) samples what ``module`` samples for the
    same control, prompt and x_T; another control changes the output by more than ``steers``; at conditioning
    scale 0 it is ``base``'s output, at 1 it is not."""
    from diffusion_lab.data.control import CONTROL_KEY
    from diffusion_lab.families.qwen_image import pack

    pil, x = control_image()
    noise = torch.randn(module.latent_shape(1), generator=torch.Generator().manual_seed(0))
    latents = pack(noise) if kind == "qwen_image" else noise
    call = dict(num_inference_steps=steps, height=32, width=32, output_type="np", latents=latents, **CONTROL_CALLS[kind])
    theirs = pipe(CONTROL_PROMPT, control_image=pil, generator=torch.Generator().manual_seed(0), **call).images
    sampled = _pipeline_control(kind, module, pipe, x, torch.Generator().manual_seed(0))

    def own(control: torch.Tensor, latents_of_control: torch.Tensor | None = None) -> np.ndarray:
        if latents_of_control is not None:
            module.family.control_input = lambda m, images: latents_of_control  # the pipeline's sample (see above)
        try:
            with torch.no_grad():
                images = module.generate(1, num_inference_steps=steps, noise=noise, cond_batch={"caption": [CONTROL_PROMPT], CONTROL_KEY: control},
                                         guidance_scale=CONTROL_CALLS[kind].get("guidance_scale", 1.0))
        finally:
            module.family.__dict__.pop("control_input", None)
        return ((images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    mine = own(x, sampled)
    assert mine.shape == (1, 32, 32, 3) and np.isfinite(mine).all()
    np.testing.assert_allclose(theirs, mine, atol=atol)
    assert np.abs(own(-torch.ones_like(x)) - own(x)).max() > steers  # the control steers it
    plain = {k: v for k, v in call.items() if k != "controlnet_conditioning_scale"}
    unsteered = pipe(CONTROL_PROMPT, control_image=pil, generator=torch.Generator().manual_seed(0), **{**call, "controlnet_conditioning_scale": 0.0}).images
    without = base(CONTROL_PROMPT, generator=torch.Generator().manual_seed(0), **plain).images
    np.testing.assert_allclose(unsteered, without, atol=atol)
    assert np.abs(theirs - without).max() > steers
