"""Diffusion processes: what a training step does to clean data, and what the network learns.

A process takes clean ``x_0`` ``[N, C, H, W]`` and returns a ``Noised`` batch: what the network
is given (``model_input``, ``timestep``), what its output is compared with (``target``), and the
per-sample loss ``weight``. One training step for every process is

    noised = process.noised(x0) ; out = net(noised.model_input, noised.timestep, **cond)
    loss = process.loss(out, noised)

Each process wraps one diffusers scheduler that holds its schedule (``self.scheduler``); samplers
are built fresh from that scheduler's config (``diffusion_lab.diffusion.sampling.Sampler``). The
math lives in ``objectives`` (vp), ``flow`` and ``edm``; this module only wires it.

    process=vp             DDPM family: epsilon / v_prediction / sample, min-SNR, zero terminal SNR
    process=flow_matching  rectified flow: x = (1 - s) x_0 + s eps, target eps - x_0
    process=edm            Karras et al. 2022: preconditioned denoiser, log-normal sigma
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from diffusers import DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

from diffusion_lab.diffusion import edm, flow, objectives
from diffusion_lab.diffusion.objectives import LossWeighting, PredictionType
from diffusion_lab.utils.errors import ConfigError

ProcessKind = Literal["vp", "flow_matching", "edm"]


@dataclass
class Noised:
    """One noised batch. ``x_t`` ``[N, C, H, W]`` is the noisy sample, ``model_input`` what the
    network sees (``c_in x_t`` for EDM), ``timestep`` ``[N]`` what it is told, ``target`` what its
    (post-processed) output is compared with, ``weight`` ``[N]``, and ``level`` ``[N]`` the noise
    level as a fraction of the schedule (0 = clean, 1 = pure noise) for per-level statistics."""

    x_t: torch.Tensor
    model_input: torch.Tensor
    timestep: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    level: torch.Tensor
    sigma: torch.Tensor | None = None


class Process:
    """Base class: noise drawing (with offset noise) and the weighted MSE shared by all processes.

    Args:
        scheduler: the diffusers scheduler holding this process's schedule.
        offset_noise: strength of offset noise (Guttenberg 2023; 0 = off).
    """

    kind: ClassVar[ProcessKind]

    def __init__(self, scheduler, offset_noise: float = 0.0) -> None:
        self.scheduler = scheduler
        self.offset_noise = offset_noise
        self.source_class = getattr(self, "source_class", type(scheduler))

    def sampling_scheduler(self, sampler):
        """A fresh diffusers scheduler running ``sampler`` (a ``Sampler``) on this schedule."""
        sampler.check(self.kind)
        return sampler.scheduler(self.scheduler, default_class=self.source_class)

    # ---- what subclasses define -----------------------------------------------------------
    def _noised(self, x0: torch.Tensor, noise: torch.Tensor, generator: torch.Generator | None) -> Noised:
        raise NotImplementedError

    def prediction(self, model_output: torch.Tensor, noised: Noised) -> torch.Tensor:
        """The network output in the space of ``noised.target`` (identity except for EDM)."""
        return model_output

    def predict_x0(self, model_output: torch.Tensor, noised: Noised) -> torch.Tensor:
        """The clean sample the network output implies."""
        raise NotImplementedError

    def at_level(self, x0: torch.Tensor, noise: torch.Tensor, level: float) -> tuple[torch.Tensor, float]:
        """(``x`` at ``level`` of the schedule in [0, 1] with this ``noise``, SNR there): the forward
        process as the noising strip shows it."""
        raise NotImplementedError

    # ---- shared -------------------------------------------------------------------------------
    @property
    def scheduler_config(self) -> dict:
        """The schedule's config, from which every sampler of this process is built."""
        return dict(self.scheduler.config)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def draw_noise(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``eps`` like ``x0`` (+ offset noise). With a generator everything is drawn on the CPU from
        it, so validation noise is the same on every device and run."""
        if generator is None:
            return objectives.add_offset_noise(torch.randn_like(x0), self.offset_noise)
        noise = torch.randn(x0.shape, generator=generator)
        return objectives.add_offset_noise(noise, self.offset_noise, generator=generator).to(x0)

    def noised(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> Noised:
        """A noised batch for ``x0`` ``[N, C, H, W]``; ``generator`` fixes noise and levels."""
        return self._noised(x0, self.draw_noise(x0, generator), generator)

    def noised_pair(self, x0_a: torch.Tensor, x0_b: torch.Tensor, generator: torch.Generator | None = None) -> Noised:
        """The batch ``[x0_a; x0_b]`` ``[2N, C, H, W]`` noised so that examples ``i`` and ``N + i``
        share their noise and level (Diffusion-DPO's winner and loser). Both halves are drawn from
        one seed on the CPU (as with a ``generator``); the seed comes from ``generator`` or the
        global RNG."""
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        a, b = (self.noised(x0, generator=torch.Generator().manual_seed(seed)) for x0 in (x0_a, x0_b))
        return Noised(**{k: None if v is None else torch.cat([v, getattr(b, k)]) for k, v in vars(a).items()})

    def loss(self, model_output: torch.Tensor, noised: Noised, reduce: bool = True, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted MSE (fp32); ``reduce=False`` gives the per-sample losses ``[N]``. ``mask``
        ``[N, 1, H, W]`` in [0, 1], at the target's size: a per-pixel loss mask (``per_sample_loss``)."""
        per_sample = objectives.per_sample_loss(self.prediction(model_output, noised), noised.target, noised.weight, mask)
        return per_sample.mean() if reduce else per_sample


def _on_device_of(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Noise levels drawn on the CPU (a seeded generator) moved to the batch's device."""
    return values.to(like.device)


class VPProcess(Process):
    """Variance-preserving (DDPM) diffusion, trained through a ``DDPMScheduler``.

    Args:
        scheduler: any diffusers DDPM-family scheduler; its betas are the schedule (a PNDM or DDIM
            config works: training always uses a ``DDPMScheduler`` built from it; the class is
            remembered as ``source_class``, the sampler ``sampler=default`` draws with).
        prediction_type: epsilon | v_prediction | sample; None keeps the scheduler's.
        loss_weighting: none | min_snr (Min-SNR-gamma, Hang et al. 2023) with ``snr_gamma``.
        zero_terminal_snr: Lin et al. 2024: betas rescaled to SNR(T) = 0 and "trailing" timestep
            spacing (sampling starts from pure noise); needs ``v_prediction``. Guidance rescale at
            sampling is ``guidance_rescale`` of the sampler / sample CLI.
    """

    kind = "vp"

    def __init__(
        self,
        scheduler,
        prediction_type: PredictionType | None = None,
        loss_weighting: LossWeighting = "none",
        snr_gamma: float = 5.0,
        zero_terminal_snr: bool = False,
        offset_noise: float = 0.0,
    ) -> None:
        overrides = {}
        if prediction_type is not None:
            overrides["prediction_type"] = prediction_type
        if zero_terminal_snr:
            overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        self.source_class = type(scheduler)
        super().__init__(DDPMScheduler.from_config(scheduler.config, **overrides), offset_noise)
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(f"process.prediction_type={self.prediction_type!r}: choose epsilon, v_prediction or sample.")
        if loss_weighting not in ("none", "min_snr"):
            raise ConfigError(f"process.loss_weighting={loss_weighting!r}: process=vp takes none or min_snr.")
        if zero_terminal_snr and self.prediction_type == "epsilon":
            raise ConfigError(
                "process.zero_terminal_snr=true with process.prediction_type=epsilon: at SNR 0 an epsilon "
                "prediction carries no information about x_0 (Lin et al. 2024, section 3.2); set "
                "process.prediction_type=v_prediction."
            )
        self.loss_weighting = loss_weighting
        self.snr_gamma = snr_gamma

    @property
    def prediction_type(self) -> PredictionType:
        return self.scheduler.config.prediction_type

    def _noised(self, x0, noise, generator):
        T = self.num_train_timesteps
        t = objectives.sample_timesteps(len(x0), T, "cpu" if generator is not None else x0.device, generator=generator).to(x0.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        target = objectives.training_target(self.scheduler, x0, noise, t, self.prediction_type)
        weight = objectives.loss_weights(self.scheduler, t, self.loss_weighting, self.prediction_type, self.snr_gamma)
        return Noised(x_t, x_t, t, target, weight, level=t.float() / (T - 1))

    def predict_x0(self, model_output, noised):
        return objectives.predict_x0(self.scheduler, model_output, noised.x_t, noised.timestep, self.prediction_type)

    def at_level(self, x0, noise, level):
        t = round(level * (self.num_train_timesteps - 1))
        x = self.scheduler.add_noise(x0, noise, torch.full((len(x0),), t, dtype=torch.long))
        return x, float(objectives.snr(self.scheduler, torch.tensor([t]))[0])


class FlowMatchingProcess(Process):
    """Rectified flow, the schedule held by a ``FlowMatchEulerDiscreteScheduler`` (its ``shift``
    is the resolution shift of SD3: 3.0 at 1024 px, 1.0 = none).

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler``.
        density: uniform | logit_normal | mode (``compute_density_for_timestep_sampling``).
        logit_mean, logit_std: of logit_normal (SD3: 0, 1); mode_scale: of mode (SD3: 1.29).
        loss_weighting: none | sigma_sqrt | cosmap (``compute_loss_weighting_for_sd3``).
    """

    kind = "flow_matching"

    def __init__(
        self,
        scheduler,
        density: flow.TimestepDensity = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        loss_weighting: flow.FlowLossWeighting = "none",
        offset_noise: float = 0.0,
    ) -> None:
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise ConfigError(f"process=flow_matching needs process.scheduler to be a FlowMatchEulerDiscreteScheduler; got {type(scheduler).__name__}.")
        if density not in ("uniform", "logit_normal", "mode"):
            raise ConfigError(f"process.density={density!r}: choose uniform, logit_normal or mode.")
        if loss_weighting not in ("none", "sigma_sqrt", "cosmap"):
            raise ConfigError(f"process.loss_weighting={loss_weighting!r}: process=flow_matching takes none, sigma_sqrt or cosmap.")
        super().__init__(scheduler, offset_noise)
        self.density, self.logit_mean, self.logit_std, self.mode_scale = density, logit_mean, logit_std, mode_scale
        self.loss_weighting = loss_weighting

    def _noised(self, x0, noise, generator):
        sigma, t = flow.sample_sigmas(self.scheduler, len(x0), self.density, self.logit_mean, self.logit_std, self.mode_scale, generator=generator)
        sigma, t = _on_device_of(sigma, x0), _on_device_of(t, x0)
        x_t = flow.noisy(x0, noise, sigma)
        weight = flow.loss_weights(self.loss_weighting, sigma)
        return Noised(x_t, x_t, t, flow.target(x0, noise), weight, level=sigma, sigma=sigma)

    def predict_x0(self, model_output, noised):
        return flow.predict_x0(model_output, noised.x_t, noised.sigma)

    def at_level(self, x0, noise, level):
        idx = round((1 - level) * (self.num_train_timesteps - 1))  # the tables run from high noise to low
        sigma = float(self.scheduler.sigmas[idx]) if level > 0 else 0.0
        x = flow.noisy(x0, noise, torch.full((len(x0),), sigma))
        return x, ((1 - sigma) / sigma) ** 2 if sigma > 0 else float("inf")


class EDMProcess(Process):
    """EDM: log-normal sigma, the scheduler's preconditioning, loss weight lambda(sigma).

    Args:
        scheduler: an ``EDMEulerScheduler`` (sigma_min, sigma_max, sigma_data, rho: the sampling
            schedule; ``prediction_type`` epsilon is EDM's c_out).
        p_mean, p_std: the training sigma density, ln sigma ~ N(p_mean, p_std^2) (EDM: -1.2, 1.2).
    """

    kind = "edm"

    def __init__(self, scheduler, p_mean: float = -1.2, p_std: float = 1.2, offset_noise: float = 0.0) -> None:
        if not isinstance(scheduler, EDMEulerScheduler):
            raise ConfigError(f"process=edm needs process.scheduler to be an EDMEulerScheduler; got {type(scheduler).__name__}.")
        super().__init__(scheduler, offset_noise)
        self.p_mean, self.p_std = p_mean, p_std

    @property
    def sigma_data(self) -> float:
        return float(self.scheduler.config.sigma_data)

    def _noised(self, x0, noise, generator):
        sigma = _on_device_of(edm.sample_sigmas(len(x0), self.p_mean, self.p_std, generator=generator), x0)
        x_t = edm.noisy(x0, noise, sigma)
        model_input, c_noise = edm.model_inputs(self.scheduler, x_t, sigma)
        lo, hi = math.log(self.scheduler.config.sigma_min), math.log(self.scheduler.config.sigma_max)
        level = ((sigma.log() - lo) / (hi - lo)).clamp(0, 1)  # position in the sampling range, log-sigma
        return Noised(x_t, model_input, c_noise, x0, edm.loss_weight(sigma, self.sigma_data), level=level, sigma=sigma)

    def prediction(self, model_output, noised):
        return edm.denoised(self.scheduler, noised.x_t, model_output, noised.sigma)

    def predict_x0(self, model_output, noised):
        return self.prediction(model_output, noised)

    def at_level(self, x0, noise, level):
        cfg = self.scheduler.config
        if level == 0:
            return x0, float("inf")
        # EDM's sampling schedule (rho-warped between sigma_min and sigma_max), eq. 5
        r = 1 / cfg.rho
        sigma = (cfg.sigma_min**r + level * (cfg.sigma_max**r - cfg.sigma_min**r)) ** cfg.rho
        x = edm.noisy(x0, noise, torch.full((len(x0),), sigma))
        # shown rescaled to the data range (x / sqrt(1 + sigma^2 / sigma_d^2)) so large sigmas stay visible
        return x / (1 + sigma**2 / cfg.sigma_data**2) ** 0.5, (cfg.sigma_data / sigma) ** 2
