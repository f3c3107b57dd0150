"""method=grpo (issue #27): the SDE / GRPO math against hand-computed values and torch.distributions,
the stochastic flow step's marginals on a Gaussian toy, and real Lightning runs: a reward rises,
wiring for flow matching and vp, exact resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from diffusion_lab.diffusion import sde
from diffusion_lab.rewards import Reward
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError


class Brightness(Reward):
    """The README's few-line reward: mean pixel value."""

    name = "brightness"

    def __call__(self, images, prompts=None):
        return images.mean(dim=(1, 2, 3))


# ---- math ---------------------------------------------------------------------------------------
def test_flow_sde_step_hand_computed():
    # sigma = 0.5 -> 0.25, a = 0.5: sigma_t = 0.5 sqrt(0.5 / 0.5) = 0.5, dt = -0.25
    # mean = 1 (1 + 0.25 / 1 (-0.25)) + 2 (1 + 0.25 0.5 / 1)(-0.25) = 0.9375 - 0.5625 = 0.375; std = 0.5 sqrt(0.25)
    mean, std = sde.flow_sde_step(torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0), 0.5, 0.25, 0.5)
    assert mean.item() == pytest.approx(0.375) and std == pytest.approx(0.25)
    # sigma = 1 takes sigma_max in sigma_t (finite), noise level 0 is the Euler step of diffusers' scheduler
    assert math.isfinite(sde.flow_sde_step(torch.ones(1), torch.ones(1), 1.0, 0.9, 0.7, sigma_max=0.9)[1])
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(4)
    x, v = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    euler = sched.step(v, sched.timesteps[1], x).prev_sample
    ode, std0 = sde.flow_sde_step(x, v, float(sched.sigmas[1]), float(sched.sigmas[2]), 0.0)
    torch.testing.assert_close(ode, euler)
    assert std0 == 0.0


def test_ddim_std_is_what_diffusers_ddim_step_adds():
    from diffusers import DDIMScheduler, DDPMScheduler

    sched = DDIMScheduler.from_config(DDPMScheduler().config)
    sched.set_timesteps(10)
    x, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    t = sched.timesteps[3]
    step = lambda noise: sched.step(eps, t, x, eta=0.7, variance_noise=noise).prev_sample  # noqa: E731
    added = step(torch.ones_like(x)) - step(torch.zeros_like(x))
    std = sde.ddim_step_std(float(sched.alphas_cumprod[t]), float(sched.alphas_cumprod[t - 100]), 0.7)
    torch.testing.assert_close(added, torch.full_like(x, std))
    assert sde.ddim_step_std(0.5, 0.8, 0.0) == 0.0
    # eta = 1 is DDPM's posterior std: beta_tilde = (1 - abar_prev) / (1 - abar_t) beta_t, with beta_t = 1 - abar_t / abar_prev
    assert sde.ddim_step_std(0.5, 0.8, 1.0) ** 2 == pytest.approx(0.2 / 0.5 * (1 - 0.5 / 0.8))


def test_log_prob_and_kl_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, ref, x = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    std = 0.37
    expected = torch.distributions.Normal(mean, std).log_prob(x).flatten(1).mean(1)
    torch.testing.assert_close(sde.gaussian_log_prob(x, mean, std), expected)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std), torch.distributions.Normal(ref, std)).flatten(1).mean(1)
    torch.testing.assert_close(sde.gaussian_kl(mean, ref, std), kl)
    # the sampled step under its own Gaussian: x = mean + std * z
    z = torch.randn(3, 2, 4, 4, generator=g)
    torch.testing.assert_close(sde.gaussian_log_prob(mean + std * z, mean, std), torch.distributions.Normal(mean, std).log_prob(mean + std * z).flatten(1).mean(1))


def test_group_advantages_and_clipped_loss_hand_computed():
    adv = sde.group_advantages(torch.tensor([1.0, 2.0, 3.0, 7.0]), group_size=2, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    adv = sde.group_advantages(torch.randn(24) * 5 + 3, group_size=8).view(3, 8)
    torch.testing.assert_close(adv.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(adv.std(1, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    torch.testing.assert_close(sde.group_advantages(torch.ones(4), 4), torch.zeros(4))  # no signal, no push
    with pytest.raises(ValueError, match="multiple of group_size"):
        sde.group_advantages(torch.ones(5), 2)
    # ratio e^0.5 = 1.6487, clip 0.2: A = 1 -> max(-1.6487, -1.2) = -1.2 ; A = -1 -> max(1.6487, 1.2) = 1.6487
    loss, clipped = sde.clipped_policy_loss(torch.tensor([0.5, 0.5, 0.0]), torch.zeros(3), torch.tensor([1.0, -1.0, 2.0]), 0.2)
    torch.testing.assert_close(loss, torch.tensor([-1.2, math.exp(0.5), -2.0]))
    torch.testing.assert_close(clipped, torch.tensor([1.0, 1.0, 0.0]))


def test_flow_sde_keeps_the_marginals_on_a_gaussian_toy():
    """Data N(m, s^2) has the exact velocity E[eps - x0 | x_sigma] in closed form; the SDE (a = 0.7)
    must end at N(m, s^2) like the ODE does (a wrong drift correction shifts the std)."""
    m, s, n, steps = 0.5, 0.3, 20000, 200
    sigmas = torch.linspace(1, 0, steps + 1).tolist()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)
    for i in range(steps):
        sig = sigmas[i]
        var = (1 - sig) ** 2 * s**2 + sig**2
        v = -m + (sig - (1 - sig) * s**2) / var * (x - (1 - sig) * m)
        mean, std = sde.flow_sde_step(x, v, sig, sigmas[i + 1], 0.7, sigma_max=sigmas[1])
        x = mean + std * torch.randn(n, generator=g) if sigmas[i + 1] > 0 else mean
    assert x.mean().item() == pytest.approx(m, abs=0.02)
    assert x.std().item() == pytest.approx(s, abs=0.02)


# ---- real runs ------------------------------------------------------------------------------------
TOY = [
    "method=grpo", "data.resolution=8", "data.batch_size=4", "method.group_size=4", "method.num_inference_steps=4",
    "callbacks.ema=null", "callbacks.noising_strip=null", "callbacks.learning_curves=null", "trainer.limit_val_batches=1",
]  # fmt: skip


def _with_reward(cfg, target: str = f"{__name__}.Brightness"):
    with open_dict(cfg):
        cfg.reward = {"_target_": target}
    return cfg


def _brightness_of_samples(module, seed: int = 0) -> float:
    return module.generate(64, 4, generator=torch.Generator().manual_seed(seed)).mean().item()


@pytest.mark.slow
def test_grpo_raises_the_reward_of_a_tiny_model(train_cfg):
    """A random tiny UNet, reward = brightness: GRPO's samples (and the plain sampler's) get brighter."""
    from hydra.utils import instantiate

    cfg = _with_reward(train_cfg(*TOY, "process=flow_matching", "trainer.max_steps=40", "model.optimizer.lr=1e-3",
                                 "model.lr_scheduler.num_warmup_steps=0", "trainer.val_check_interval=40"))  # fmt: skip
    torch.manual_seed(0)
    before = _brightness_of_samples(instantiate(cfg.model))
    _, objects = train(cfg)
    after = _brightness_of_samples(objects["model"])
    metrics = objects["trainer"].logged_metrics
    assert after > before + 0.3, (before, after)
    assert float(metrics["train/reward_mean"]) > before + 0.3


@pytest.mark.parametrize("process", ["flow_matching", "vp"])
def test_grpo_two_step_run_logs_and_exports(train_cfg, process):
    cfg = _with_reward(train_cfg(*TOY, f"process={process}", "trainer.max_steps=2", "method.kl_weight=0.1", "method.timesteps_per_step=2"))
    _, objects = train(cfg)
    logged = objects["trainer"].logged_metrics
    for key in ("train/reward_mean", "train/reward_std", "train/kl", "train/clip_frac", "train/loss"):
        assert key in logged and torch.isfinite(torch.as_tensor(logged[key])), key
    assert float(logged["train/kl"]) > 0  # the policy moved away from the reference after one step
    run = objects["trainer"].default_root_dir
    assert (Path(run) / "pipeline" / "model_index.json").is_file() and list((Path(run) / "samples").glob("*.png"))
    # GRPO's num_inference_steps is its training sampler's: the export records no sampling default (distill's does)
    assert not (Path(run) / "pipeline" / "diffusion_lab.json").exists()


def test_grpo_without_reward_or_on_edm_is_a_config_error(train_cfg):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    with pytest.raises((ConfigError, InstantiationException), match="reward="):
        instantiate(train_cfg(*TOY).model)
    cfg = _with_reward(train_cfg(*TOY, "process=edm", "sampler=edm_euler", "trainer.max_steps=1"))
    with pytest.raises(ConfigError, match="process=edm"):
        train(cfg)


def test_grpo_resume_is_exact(train_cfg, tmp_path):
    """3 steps straight == 1 step, stop, resume to 3: the trajectories reused across 2 updates and the
    KL's reference (the starting weights, not the resumed ones) sit in the checkpoint."""
    common = [*TOY, "process=flow_matching", "method.updates_per_sample=2", "method.timesteps_per_step=2", "method.kl_weight=1.0", "model.optimizer.lr=1e-3", "model.lr_scheduler=null",
              "callbacks.model_checkpoint.every_n_train_steps=1", "trainer.val_check_interval=100", "trainer.limit_val_batches=0"]  # fmt: skip
    _, straight = train(_with_reward(train_cfg(*common, "trainer.max_steps=3")))
    first = _with_reward(train_cfg(*common, "trainer.max_steps=1"))
    with open_dict(first):
        first.paths.output_dir = str(tmp_path / "first")
    train(first)
    resumed_cfg = _with_reward(train_cfg(*common, "trainer.max_steps=3", f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}"))
    with open_dict(resumed_cfg):
        resumed_cfg.paths.output_dir = str(tmp_path / "resumed")
    _, resumed = train(resumed_cfg)
    a, b = straight["model"].backbone.state_dict(), resumed["model"].backbone.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_grpo_lora_on_a_text_to_image_model_with_prompted_rewards(tmp_path):
    """adapter=lora on tiny SD (vp: the DDIM eta step): prompts are the batch's captions, the digit
    reward reads the prompted digit, the reference is the base with the adapter off."""
    from diffusion_lab.testing import tiny
    from diffusion_lab.methods.base import has_adapter
    from tests.conftest import compose_cfg

    start = tiny.build(tmp_path / "tiny_sd")
    cfg = compose_cfg("train", ["experiment=sd_finetune_tiny", "adapter=lora", "method=grpo", "reward=digit_classifier", "data=digits_captioned",
                                "data.resolution=32", "data.batch_size=2", "data.num_workers=0", f"model.pretrained={start}", "trainer.max_steps=2",
                                "trainer.log_every_n_steps=1", "method.group_size=2", "method.num_inference_steps=3", "method.kl_weight=0.1",
                                "model.optimizer.lr=1e-2", "callbacks.sample_grid=null", "callbacks.ema=null", "callbacks.progress_bar=null",
                                "callbacks.noising_strip=null", "trainer.limit_val_batches=0"], tmp_path / "run")  # fmt: skip
    _, objects = train(cfg)
    module, grpo = objects["model"], objects["model"].method
    assert grpo.reference.copy is None and has_adapter(module.base_backbone)
    buf = grpo._buffer
    assert buf["cond_batch"]["caption"][0] == buf["cond_batch"]["caption"][1]  # a group shares its prompt
    assert buf["rewards"].shape == (4,) and 0 <= float(buf["rewards"].min()) <= float(buf["rewards"].max()) <= 1
    assert float(objects["trainer"].logged_metrics["train/kl"]) > 0


class SaveRewards(pl.Callback):
    """Each rank writes the rewards of its last sampled groups and a checksum of its weights."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        weights = sum(p.detach().double().sum() for p in pl_module.backbone.parameters())
        torch.save({"rewards": pl_module.method._buffer["rewards"], "weights": weights}, self.dirpath / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_grpo_under_two_process_ddp(tmp_path):
    """trainer=ddp_cpu: each rank samples its own groups (different rewards), weights stay identical."""
    from tests.multiproc import run_cli, tiny

    out = tmp_path / "run"
    args = tiny("trainer=ddp_cpu", *TOY, "process=flow_matching", "trainer.max_steps=2", f"+reward._target_={__name__}.Brightness",
                f"+callbacks.save_rewards._target_={__name__}.SaveRewards", f"+callbacks.save_rewards.dirpath={out / 'probe'}", f"hydra.run.dir={out}")  # fmt: skip
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(out / "probe" / f"rank{k}.pt") for k in (0, 1))
    assert not torch.equal(r0["rewards"], r1["rewards"])
    assert float(r0["weights"]) == float(r1["weights"])
