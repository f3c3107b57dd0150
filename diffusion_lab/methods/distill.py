"""``method=distill``: few-step consistency distillation of the starting model (the teacher).

vp: Latent Consistency distillation (Luo et al. 2023), as diffusers' ``train_lcm_distill_*`` scripts
train it; flow matching: the same consistency distillation in the flow parameterisation (the
teacher's DDIM step is its Euler step; ``x0_hat = x - sigma v`` meets the boundary by itself). The
math is ``diffusion_lab/diffusion/consistency.py``; one step is

    x_n      = alpha_n x_0 + sigma_n eps                      n ~ U{1..N} on the solver grid
    x_{n-1}  = DDIM step of the teacher (guided by w ~ U[guidance_min, guidance_max] where it has an uncond)
    loss     = huber( f_student(x_n), f_target(x_{n-1}) )

The teacher is ``frozen_reference`` (LoRA: the base with the adapter off = LCM-LoRA; full: a frozen
copy). The target is an EMA of the student (full fine-tune, ``target_decay``) or the student itself
under no_grad (a LoRA, or ``target_decay: 0``), as diffusers' LoRA script does. The student samples with
``sampler=lcm`` in ``num_inference_steps`` steps, recorded in the export (``diffusion_lab.json``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from diffusion_lab.diffusion import consistency as C
from diffusion_lab.diffusion.sampling import guided
from diffusion_lab.methods.base import Method, frozen_reference, has_adapter
from diffusion_lab.utils.errors import ConfigError

if TYPE_CHECKING:
    from diffusion_lab.modules.diffusion_module import DiffusionModule


class Distill(Method):
    """Consistency distillation.

    Args:
        num_solver_steps: points of the teacher solver's grid (LCM: 50; LCMScheduler's
            ``original_inference_steps`` must match it for vp).
        loss: huber (pseudo-Huber, LCM's) | l2.
        huber_c: the pseudo-Huber constant.
        target_decay: EMA decay of the target network (full fine-tune; LCM: 0.95); 0 = the student
            itself under no_grad (always so with an adapter).
        guidance_min, guidance_max: classifier-free guidance weight of the teacher, drawn uniformly
            per step (``u + w (c - u)``; equal = fixed), for models with an unconditional input.
        num_inference_steps: the step count the student is exported for (``diffusion_lab.sample``'s default).
    """

    name = "distill"
    samplers = ("lcm",)  # ``sampler=`` options that sample a consistency student

    def __init__(
        self,
        num_solver_steps: int = 50,
        loss: C.ConsistencyLoss = "huber",
        huber_c: float = 0.001,
        target_decay: float = 0.95,
        guidance_min: float = 4.0,
        guidance_max: float = 8.0,
        num_inference_steps: int = 2,
    ) -> None:
        if loss not in ("huber", "l2"):
            raise ConfigError(f"method.loss={loss!r}: choose huber or l2.")
        if not 0 <= target_decay < 1:
            raise ConfigError(f"method.target_decay={target_decay}: an EMA decay in [0, 1) (0 = the student itself).")
        if num_solver_steps < 1 or num_inference_steps < 1 or guidance_min > guidance_max:
            raise ConfigError(
                f"method.num_solver_steps={num_solver_steps}, method.num_inference_steps={num_inference_steps}, "
                f"method.guidance_min/max={guidance_min}/{guidance_max}: steps must be >= 1 and guidance_min <= guidance_max."
            )
        self.num_solver_steps, self.loss, self.huber_c = num_solver_steps, loss, huber_c
        self.target_decay, self.guidance = target_decay, (guidance_min, guidance_max)
        self.num_inference_steps = self.sample_steps = num_inference_steps
        self.teacher: frozen_reference | None = None
        self.target: frozen_reference | None = None
        self._updated_at = 0

    def setup(self, module: "DiffusionModule") -> None:
        kind = module.process.kind
        if kind not in ("vp", "flow_matching"):
            raise ConfigError(f"method=distill distills models trained with process=vp or flow_matching, not process={kind}.")
        if module.sampler.name not in self.samplers:
            raise ConfigError(
                f"method=distill with sampler={module.sampler.name}: the student is a consistency model and samples in "
                f"{self.num_inference_steps} steps with sampler=lcm (the export carries it); set sampler=lcm."
            )
        lcm_grid = module.sampling_scheduler().config.get("original_inference_steps")
        if kind == "vp" and lcm_grid != self.num_solver_steps:
            raise ConfigError(
                f"method.num_solver_steps={self.num_solver_steps} but LCMScheduler samples on a {lcm_grid}-point grid: "
                f"set sampler.options.vp.original_inference_steps={self.num_solver_steps} (or method.num_solver_steps={lcm_grid})."
            )
        self.grid = C.solver_grid(module.process, self.num_solver_steps)
        self.teacher = frozen_reference(module)  # before a checkpoint is restored: the starting model
        if self.target_decay > 0 and not has_adapter(module.base_backbone):
            self.target = frozen_reference(module)  # a copy of the student, moved towards it by EMA (resumed by load_state_dict)

    def _update_target(self, module: "DiffusionModule") -> None:
        """EMA of the student's weights after each optimizer step: target <- decay target + (1 - decay) student."""
        if self.target is None or module.global_step == self._updated_at:
            return
        self._updated_at = module.global_step
        with torch.no_grad():
            for t, s in zip(self.target.copy.parameters(), module.base_backbone.parameters()):
                t.lerp_(s.detach().to(t), 1 - self.target_decay)

    def _target_context(self):
        return self.target() if self.target is not None else torch.no_grad()

    def training_step(self, module: "DiffusionModule", batch: dict, batch_idx: int) -> torch.Tensor:
        self._update_target(module)
        process, grid = module.process, self.grid
        x0 = module.encode(batch)
        n = len(x0)
        cond = module.conditioning(batch, train=False)  # the teacher's guided trajectory: no caption dropout
        uncond = module.sampling_conditioning(batch, n)[1] if self.guidance[1] > 1 else None
        if uncond is not None:
            self.sample_guidance = 1.0  # the teacher's guidance is distilled into the student: its exports sample unguided
        g = grid.at(torch.randint(0, len(grid), (n,)), x0.device)
        x_t = C.noisy(x0, process.draw_noise(x0), g.alpha, g.sigma)

        # student: f(x_n, t_n)
        out = module.denoise(x_t, g.timestep, **cond)
        f_student = C.consistency_output(x_t, C.predict_x0(process, out, x_t, g.timestep, g.sigma), g.c_skip, g.c_out)

        with torch.no_grad():
            # teacher: one (guided) DDIM step t_n -> t_{n-1}
            with self.teacher():
                t_out = self._guided(module, x_t, g.timestep, cond, uncond)
            x0_hat = C.predict_x0(process, t_out, x_t, g.timestep, g.sigma)
            x_prev = C.noisy(x0_hat, C.implied_eps(x_t, x0_hat, g.alpha, g.sigma), g.prev_alpha, g.prev_sigma)
            # target: f(x_{n-1}, t_{n-1})
            with self._target_context():
                out_prev = module.denoise(x_prev, g.prev_timestep, **cond)
            f_target = C.consistency_output(x_prev, C.predict_x0(process, out_prev, x_prev, g.prev_timestep, g.prev_sigma), g.prev_c_skip, g.prev_c_out)

        loss = C.consistency_loss(f_student, f_target, self.loss, self.huber_c)
        module.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def _guided(self, module: "DiffusionModule", x_t, t, cond: dict, uncond: dict | None) -> torch.Tensor:
        """The teacher's output, classifier-free guided with a weight drawn from ``[guidance_min, guidance_max]``."""
        if uncond is None:
            return module.denoise(x_t, t, **cond)
        lo, hi = self.guidance
        w = lo + (hi - lo) * torch.rand(()).item()
        return guided(module.denoise, x_t, t, cond, uncond, w, module.guide)[0]

    def state_dict(self) -> dict[str, Any]:
        """The EMA target's weights (trained state; the teacher is rebuilt by ``setup``)."""
        state: dict[str, Any] = {"updated_at": self._updated_at}
        if self.target is not None and self.target.copy is not None:
            state["target"] = {k: v.detach().cpu() for k, v in self.target.copy.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # a resume: after ``setup`` (which built the target from the starting weights)
        self._updated_at = state.get("updated_at", 0)
        if state.get("target") is not None and self.target is not None:
            self.target.copy.load_state_dict(state["target"])
