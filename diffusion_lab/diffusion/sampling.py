"""Reverse-process sampling as a plain function that takes the network (EDM style).

Works with any diffusers scheduler: it calls ``scale_model_input`` and scales the initial noise
by ``init_noise_sigma`` (DDPMPipeline does neither, so Euler/Heun would be wrong there).
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from tqdm.auto import tqdm

# denoise(x_t [N,C,H,W], t, **cond) -> model output [N,C,H,W]
DenoiseFn = Callable[..., torch.Tensor]


@torch.no_grad()
def sample(
    denoise: DenoiseFn,
    scheduler,
    shape: tuple[int, ...],
    num_inference_steps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    cond: dict | None = None,
    uncond: dict | None = None,
    guidance_scale: float = 1.0,
    noise: torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Draw ``shape`` samples; returns the final ``x_0`` estimate ``[N, C, H, W]``.

    ``scheduler`` is mutated (``set_timesteps``): pass a fresh one (``cls.from_config(...)``).
    With ``guidance_scale > 1`` and ``uncond`` given, classifier-free guidance
    (Ho & Salimans 2022): ``out = u + w * (c - u)``, both halves in one batched call.
    ``noise`` fixes x_T (e.g. for sample grids that are comparable across steps).
    """
    cond = cond or {}
    scheduler.set_timesteps(num_inference_steps, device=device)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32)
    x = noise.to(device=device, dtype=torch.float32) * scheduler.init_noise_sigma
    use_cfg = uncond is not None and guidance_scale != 1.0
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
        x_in = scheduler.scale_model_input(x, t).to(dtype)
        t_batch = t.expand(x.shape[0]) if t.ndim == 0 else t
        if use_cfg:
            both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
            out_u, out_c = denoise(torch.cat([x_in, x_in]), torch.cat([t_batch, t_batch]), **both).chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)
        else:
            out = denoise(x_in, t_batch, **cond)
        x = scheduler.step(out.float(), t, x, **step_kwargs).prev_sample
    return x
