"""Reverse-process sampling: samplers as config parts, and one loop that takes the network (EDM style).

A ``Sampler`` (``conf/sampler/``) is an algorithm; which diffusers scheduler class runs it depends
on the process that trained the model (``sampler=dpmpp`` is ``DPMSolverMultistepScheduler`` for
vp, the same class with flow sigmas for flow_matching, ``EDMDPMSolverMultistepScheduler`` for edm).
Every sampler is built fresh (``from_config``) from the process's scheduler config, so it keeps
the trained schedule and prediction type.

``sample`` works with any diffusers scheduler: it calls ``scale_model_input`` (EDM's ``c_in``,
Euler's input scaling) and scales the initial noise by ``init_noise_sigma`` where the scheduler
has them (DDPMPipeline does neither, so Euler/Heun/EDM would be wrong there). The timesteps it
hands the network are the scheduler's (``t`` for vp, ``sigma * 1000`` for flow, ``c_noise`` for edm).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from hydra.utils import get_class
from tqdm.auto import tqdm

from diffusion_lab.utils.errors import ConfigError

# denoise(x_t [N,C,H,W], t [N], **cond) -> model output [N,C,H,W]
DenoiseFn = Callable[..., torch.Tensor]

PROCESS_KINDS = ("vp", "flow_matching", "edm")


def process_kind(scheduler) -> str:
    """Which process a diffusers scheduler samples: flow_matching for FlowMatch* classes or flow
    sigmas, edm for EDM* classes, else vp (the DDPM family)."""
    name = type(scheduler).__name__
    if name.startswith("FlowMatch") or scheduler.config.get("use_flow_sigmas"):
        return "flow_matching"
    if name.startswith("EDM"):
        return "edm"
    return "vp"


@dataclass
class Sampler:
    """A sampling algorithm: ``classes[process kind]`` is the diffusers scheduler class that runs it
    (a missing kind: the sampler cannot sample that process), ``options[kind]`` extra config keys.
    ``classes[kind] = None`` means the class the process's scheduler was saved as."""

    name: str
    classes: dict[str, str | None]
    options: dict[str, dict] = field(default_factory=dict)

    def supports(self, kind: str) -> bool:
        return kind in self.classes

    def check(self, kind: str, key: str = "sampler") -> None:
        """ConfigError naming both keys when this sampler cannot sample ``kind``."""
        if not self.supports(kind):
            raise ConfigError(
                f"{key}={self.name} cannot sample a model trained with process={kind}: it runs for "
                f"{', '.join(self.classes) or 'no process'}. Pick one that runs for {kind} (README, "
                f"'Processes and samplers', lists them; e.g. sampler=default, its natural sampler), or another process."
            )

    def scheduler(self, base, default_class: type | None = None):
        """A fresh scheduler running this sampler on the schedule of ``base`` (a process's or a
        saved pipeline's scheduler); ``default_class`` (else ``type(base)``) for ``classes[kind] = None``."""
        kind = process_kind(base)
        self.check(kind)
        path = self.classes[kind]
        cls = get_class(path) if path else (default_class or type(base))
        scheduler_config = dict(base.config)
        options = dict(self.options.get(kind, {}))
        if kind == "flow_matching" and "shift" in scheduler_config and "flow_shift" in inspect.signature(cls.__init__).parameters:
            options.setdefault("flow_shift", scheduler_config["shift"])  # the same resolution shift
        if scheduler_config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
            raise ConfigError(
                f"sampler={self.name} ({cls.__name__}) cannot sample a zero-terminal-SNR schedule "
                f"(process.zero_terminal_snr=true); use sampler=ddim, dpmpp, euler, unipc or ddpm."
            )
        accepted = inspect.signature(cls.__init__).parameters  # a flow schedule's `shift` means nothing to DPM-Solver
        return cls.from_config({k: v for k, v in scheduler_config.items() if k in accepted}, **options)


def load_sampler(name: str) -> Sampler:
    """The ``conf/sampler/<name>.yaml`` sampler (what ``sampler=<name>`` builds)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from diffusion_lab.utils.config_path import conf_dir

    path = conf_dir() / "sampler" / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"unknown sampler {name!r}; conf/sampler has {', '.join(names)}.")
    return instantiate(OmegaConf.load(path))


def class_labels(start: int, n: int, num_classes: int) -> torch.Tensor:
    """Labels ``start, start+1, ...`` modulo ``num_classes``, shape ``[n]``: class-conditional
    samples take the classes in turn, batch after batch."""
    return (torch.arange(n) + start).remainder(num_classes)


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
    guidance_rescale: float = 0.0,
    noise: torch.Tensor | None = None,
    progress: bool = False,
    schedule: dict | None = None,
    guide: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Draw ``shape`` samples; returns the final ``x_0`` estimate ``[N, C, H, W]``.

    ``scheduler`` is mutated (``set_timesteps``): pass a fresh one (``Sampler.scheduler``).
    With ``guidance_scale > 1`` and ``uncond`` given, classifier-free guidance
    (Ho & Salimans 2022): ``out = u + w * (c - u)``, both halves in one batched call;
    ``guidance_rescale`` (Lin et al. 2024, eq. 16) rescales it back towards the conditional std.
    ``noise`` fixes x_T (e.g. for sample grids that are comparable across steps).
    ``schedule``: extra ``set_timesteps`` arguments, as a pipeline passes them (Flux: custom
    ``sigmas`` and the resolution shift ``mu``). ``guide(cond, uncond, w)``: a pipeline's own guidance rule
    instead of ``u + w (c - u)`` (Qwen-Image's norm-rescaled true CFG, Z-Image's ``c + w (c - u)``).
    """
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    cond = cond or {}
    scheduler.set_timesteps(num_inference_steps, device=device, **(schedule or {}))
    if noise is None:
        noise = torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32)
    x = noise.to(device=device, dtype=torch.float32) * getattr(scheduler, "init_noise_sigma", 1.0)
    use_cfg = uncond is not None and guidance_scale != 1.0
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)  # flow schedulers take x as it is
    for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
        x_in = scale(x, t).to(dtype)
        t_batch = t.expand(x.shape[0]) if t.ndim == 0 else t
        if use_cfg:
            out, out_c = guided(denoise, x_in, t_batch, cond, uncond, guidance_scale, guide)
            if guidance_rescale > 0:
                out = rescale_noise_cfg(out, out_c, guidance_rescale=guidance_rescale)
        else:
            out = denoise(x_in, t_batch, **cond)
        x = scheduler.step(out.float(), t, x, **step_kwargs).prev_sample
    return x


def guided(denoise: DenoiseFn, x: torch.Tensor, t: torch.Tensor, cond: dict, uncond: dict, scale: float, guide: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(classifier-free guided output, conditional output): both halves in one batched call, combined
    by the family's ``guide(c, u, w)`` or ``u + w (c - u)`` (Ho & Salimans 2022)."""
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    out_u, out_c = denoise(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
    return (guide(out_c, out_u, scale) if guide is not None else out_u + scale * (out_c - out_u)), out_c


def sample_batches(
    denoise: DenoiseFn,
    make_scheduler: Callable[[], object],
    shape: tuple[int, ...],
    num_images: int,
    batch_size: int,
    num_inference_steps: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    num_classes: int | None = None,
    noise: torch.Tensor | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """``[num_images, *shape]`` in [-1, 1] for unconditional / class-conditional networks, drawn in
    batches of ``batch_size`` with one seeded generator (``noise`` fixes every x_T instead); class
    labels (``num_classes``) go 0..K-1 in turn. What ``diffusion_lab.sample``, ``evaluate`` and
    the sampler study all call."""
    g = torch.Generator().manual_seed(seed)
    out = []
    starts = range(0, num_images, batch_size)
    for start in tqdm(starts, desc="batches", disable=not progress or len(starts) == 1):
        n = min(batch_size, num_images - start)
        cond = {"class_labels": class_labels(start, n, num_classes).to(device)} if num_classes else {}
        x_T = noise[start : start + n] if noise is not None else None
        x = sample(denoise, make_scheduler(), (n, *shape), num_inference_steps, generator=g, device=device, cond=cond, noise=x_T, progress=progress)
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)
