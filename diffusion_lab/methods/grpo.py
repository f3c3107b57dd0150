"""``method=grpo``: online reward fine-tuning, GRPO on stochastic sampling (Flow-GRPO, Liu et al.
2025; DDPO, Black et al. 2023). The math is ``diffusion_lab/diffusion/sde.py``; this wires it.

One training step:

1. prompts: the batch's captions (text-to-image models; ``prompts_per_step`` of them), or none
   (pixel models: ``prompts_per_step`` groups of plain samples);
2. sample ``group_size`` images per prompt with the current weights and a stochastic sampler whose
   steps are Gaussian (vp: DDIM with ``eta``; flow matching: Flow-GRPO's SDE with ``noise_level``),
   recording the trajectory and each step's log-probability; the last step (to sigma = 0 / abar = 1)
   is deterministic and not trained;
3. score the final images with the reward (``reward=``); advantages normalised within each group;
4. loss over ``timesteps_per_step`` of the stochastic steps (drawn at random): PPO's clipped ratio
   of the new to the recorded log-probability, plus ``kl_weight`` x the KL of the step to the
   frozen reference (``frozen_reference``: the adapter off, or a copy of the starting weights).

``updates_per_sample`` > 1 reuses one set of trajectories for that many optimizer steps (the ratio
then leaves 1 and clipping acts). Under DDP each rank samples whole groups for its own prompts, so
advantages are local to the rank and need no communication; gradients are averaged by DDP as usual.
Logged: ``train/reward_mean``, ``train/reward_std``, ``train/kl``, ``train/clip_frac``,
``train/loss``; sample grids come from the ``sample_grid`` callback (the deterministic sampler).
Guidance is off while sampling for the reward (every group member sees its prompt only).
"""

from __future__ import annotations

from typing import Any

import torch

from diffusion_lab.diffusion import sde
from diffusion_lab.methods.base import Method, frozen_reference
from diffusion_lab.modules.diffusion_module import batch_len
from diffusion_lab.rewards.base import Reward
from diffusion_lab.utils.errors import ConfigError


class GRPO(Method):
    """Group relative policy optimisation against ``reward``.

    Args:
        reward: the scorer (``reward=``, ``conf/reward/``).
        group_size: G, images per prompt (advantages are normalised within the G).
        prompts_per_step: groups per step and rank (None: one per batch example).
        num_inference_steps: steps of the stochastic sampler (Flow-GRPO trains with 10).
        noise_level: ``a`` of the flow-matching SDE (Flow-GRPO: 0.7).
        eta: DDIM's eta for vp models (1 = DDPM's posterior variance; DDPO: 1.0).
        timesteps_per_step: how many of the stochastic steps enter the loss (None: all); fewer saves memory.
        clip_range: PPO's ratio clip.
        kl_weight: beta of the KL to the reference (0: none, no reference forward pass is needed for the loss).
        updates_per_sample: optimizer steps per set of sampled trajectories.
        adv_eps: added to the group's reward std.
    """

    name = "grpo"

    def __init__(
        self,
        reward: Reward | None,
        group_size: int = 8,
        prompts_per_step: int | None = None,
        num_inference_steps: int = 10,
        noise_level: float = 0.7,
        eta: float = 1.0,
        timesteps_per_step: int | None = None,
        clip_range: float = 0.2,
        kl_weight: float = 0.0,
        updates_per_sample: int = 1,
        adv_eps: float = 1e-4,
    ) -> None:
        if reward is None:
            raise ConfigError("method=grpo needs a reward: add reward=digit_classifier | clip_score | local (conf/reward/).")
        if group_size < 2:
            raise ConfigError(f"method.group_size={group_size}: GRPO compares samples within a group; use 2 or more.")
        if num_inference_steps < 2:
            raise ConfigError(f"method.num_inference_steps={num_inference_steps}: the sampler needs 2 or more steps (the last is deterministic).")
        if updates_per_sample < 1:
            raise ConfigError(f"method.updates_per_sample={updates_per_sample}: use 1 or more.")
        self.reward = reward
        self.group_size, self.prompts_per_step = group_size, prompts_per_step
        self.num_inference_steps, self.noise_level, self.eta = num_inference_steps, noise_level, eta
        self.timesteps_per_step, self.clip_range, self.kl_weight = timesteps_per_step, clip_range, kl_weight
        self.updates_per_sample, self.adv_eps = updates_per_sample, adv_eps
        self.reference: frozen_reference | None = None
        self._buffer: dict[str, Any] | None = None  # the trajectories being trained on
        self._uses = 0

    # ---- Method ---------------------------------------------------------------------------------
    def setup(self, module) -> None:
        if module.process.kind not in ("vp", "flow_matching"):
            raise ConfigError(
                f"method=grpo samples with a Gaussian step of known log-probability, written for process=vp (DDIM, eta > 0) "
                f"and process=flow_matching (Flow-GRPO's SDE); process={module.process.kind} has none here. Use one of those."
            )
        if module.process.kind == "vp" and self.eta <= 0:
            raise ConfigError(f"method.eta={self.eta}: GRPO needs a stochastic DDIM step (eta > 0) for process=vp.")
        if module.process.kind == "flow_matching" and self.noise_level <= 0:
            raise ConfigError(f"method.noise_level={self.noise_level}: GRPO needs a stochastic step (noise_level > 0) for process=flow_matching.")
        self.reference = frozen_reference(module)  # before a checkpoint is restored: the starting weights

    def state_dict(self) -> dict[str, Any]:
        """The trajectories in use and how many updates they have had (the reference is rebuilt by ``setup``)."""
        return {"buffer": self._buffer, "uses": self._uses}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._buffer, self._uses = state.get("buffer"), int(state.get("uses", 0))

    def training_step(self, module, batch: dict, batch_idx: int) -> torch.Tensor:
        if self._buffer is None or self._uses >= self.updates_per_sample:
            self._buffer = self.collect(module, batch)
            self._uses = 0
            n = len(self._buffer["rewards"])
            module.log("train/reward_mean", self._buffer["rewards"].mean(), prog_bar=True, batch_size=n, sync_dist=True)
            module.log("train/reward_std", self._buffer["rewards"].std(unbiased=False), batch_size=n, sync_dist=True)
        self._uses += 1
        loss, kl, clip_frac = self.loss(module, self._buffer)
        n = len(self._buffer["rewards"])
        module.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
        module.log("train/kl", kl, batch_size=n, sync_dist=True)
        module.log("train/clip_frac", clip_frac, batch_size=n, sync_dist=True)
        return loss

    # ---- sampling groups ----------------------------------------------------------------------
    def _prompts(self, module, batch: dict) -> tuple[list[str] | None, dict | None, int]:
        """(prompts repeated G times or None, the cond_batch for ``sampling_conditioning``, groups)."""
        groups = self.prompts_per_step or batch_len(batch)
        G = self.group_size
        if hasattr(module, "text_states"):  # text-to-image: the captions are the prompts
            captions = list(module._captions(batch))[:groups]
            prompts = [c for c in captions for _ in range(G)]
            return prompts, {"caption": prompts}, len(captions)
        if getattr(module.conditioner, "num_classes", None) and "label" in batch:  # class-conditional pixel model
            labels = torch.as_tensor(batch["label"])[:groups]
            return None, {"label": labels.repeat_interleave(G)}, len(labels)
        return None, None, groups

    def _schedule(self, module, shape: tuple[int, ...]) -> dict[str, Any]:
        """The sampler's table: network timesteps ``[S]``, and per step either (sigma, sigma_next)
        (flow) or (abar_t, abar_prev) (vp), plus each step's std ``[S]`` (0: deterministic)."""
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

        S = self.num_inference_steps
        if module.process.kind == "flow_matching":
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(module.process.scheduler.config)
            scheduler.set_timesteps(S, device="cpu", **(module.sampling_schedule(scheduler, shape, S) or {}))
            sigmas = [float(s) for s in scheduler.sigmas]
            x = torch.zeros(1)
            stds = [sde.flow_sde_step(x, x, sigmas[i], sigmas[i + 1], self.noise_level, sigmas[1])[1] if sigmas[i + 1] > 0 else 0.0 for i in range(S)]
            return {"timesteps": scheduler.timesteps.float(), "sigmas": sigmas, "stds": stds, "scheduler": None}
        scheduler = DDIMScheduler.from_config(module.process.scheduler.config)
        scheduler.set_timesteps(S)
        abar = scheduler.alphas_cumprod
        stds = []
        for t in scheduler.timesteps.tolist():
            prev = t - scheduler.config.num_train_timesteps // S  # DDIMScheduler.step's previous timestep
            abar_prev = float(abar[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
            stds.append(sde.ddim_step_std(float(abar[t]), abar_prev, self.eta))
        return {"timesteps": scheduler.timesteps, "stds": stds, "scheduler": scheduler}

    def _step_mean(self, table: dict, j: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The mean of step ``j``'s Gaussian from the network output ``out``."""
        if table["scheduler"] is None:
            s = table["sigmas"]
            return sde.flow_sde_step(x, out, s[j], s[j + 1], self.noise_level if table["stds"][j] > 0 else 0.0, s[1])[0]
        t = table["timesteps"][j]
        # diffusers' DDIM step with zero variance noise is the mean of the eta-step (x0 clipping and all)
        return table["scheduler"].step(out, t, x, eta=self.eta, variance_noise=torch.zeros_like(x)).prev_sample

    def _denoise(self, module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return module.denoise(x, t.to(module.device).expand(x.shape[0]), **cond).float()

    @torch.no_grad()
    def collect(self, module, batch: dict) -> dict[str, Any]:
        """Sample the groups, record the trajectory and log-probabilities, score, advantages (CPU tensors)."""
        prompts, cond_batch, groups = self._prompts(module, batch)
        n = groups * self.group_size
        shape = module.latent_shape(n)
        table = self._schedule(module, shape)
        cond, _ = module.sampling_conditioning(cond_batch, n)
        x = torch.randn(shape, device=module.device)
        xs, log_probs = [x], []
        for j, t in enumerate(table["timesteps"]):
            mean = self._step_mean(table, j, x, self._denoise(module, x, t, cond))
            std = table["stds"][j]
            x = mean + std * torch.randn_like(mean) if std > 0 else mean
            log_probs.append(sde.gaussian_log_prob(x, mean, std) if std > 0 else torch.zeros(n, device=x.device))
            xs.append(x)
        images = module.decode(x).float().clamp(-1, 1)
        self.reward.to(module.device)  # setup ran before the module reached its device
        rewards = torch.as_tensor(self.reward(images, prompts), dtype=torch.float32).flatten().cpu()
        if len(rewards) != n:
            raise ConfigError(f"reward={getattr(self.reward, 'name', type(self.reward).__name__)} returned {len(rewards)} scores for {n} images; a reward returns one score per image.")
        return {
            "xs": torch.stack(xs).cpu(),  # [S + 1, N, c, h, w]
            "log_probs": torch.stack(log_probs).cpu(),  # [S, N]
            "rewards": rewards,
            "advantages": sde.group_advantages(rewards, self.group_size, self.adv_eps),
            "cond_batch": cond_batch,
        }

    # ---- the loss ----------------------------------------------------------------------------------
    def loss(self, module, buf: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, mean KL to the reference, fraction of clipped ratios) over a random subset of the stochastic steps."""
        xs = buf["xs"].to(module.device)
        n = xs.shape[1]
        table = self._schedule(module, tuple(xs.shape[1:]))
        cond, _ = module.sampling_conditioning(buf["cond_batch"], n)
        stochastic = [j for j, s in enumerate(table["stds"]) if s > 0]
        k = min(self.timesteps_per_step or len(stochastic), len(stochastic))
        chosen = [stochastic[i] for i in torch.randperm(len(stochastic))[:k].tolist()]
        adv = buf["advantages"].to(module.device)
        loss = torch.zeros((), device=module.device)
        kls, clipped = [], []
        for j in chosen:
            t, std, x = table["timesteps"][j], table["stds"][j], xs[j]
            mean = self._step_mean(table, j, x, self._denoise(module, x, t, cond))
            log_prob = sde.gaussian_log_prob(xs[j + 1], mean, std)
            policy, clip = sde.clipped_policy_loss(log_prob, buf["log_probs"][j].to(module.device), adv, self.clip_range)
            with self.reference():
                ref_mean = self._step_mean(table, j, x, self._denoise(module, x, t, cond))
            kl = sde.gaussian_kl(mean, ref_mean, std)
            step_loss = policy.mean() + (self.kl_weight * kl.mean() if self.kl_weight > 0 else 0.0)
            loss = loss + step_loss / k
            kls.append(kl.detach().mean())
            clipped.append(clip.mean())
        return loss, torch.stack(kls).mean(), torch.stack(clipped).mean()
