"""method=distill: the consistency math against diffusers' schedulers and hand-computed values, a real
Lightning run that exports a few-step pipeline plain diffusers loads, and a toy problem on which the
distilled student's 2-step samples beat the teacher's."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler, UNet2DModel

from diffusion_lab.components.vae import IdentityCodec
from diffusion_lab.diffusion import consistency as C
from diffusion_lab.diffusion.processes import FlowMatchingProcess, VPProcess
from diffusion_lab.diffusion.sampling import load_sampler
from diffusion_lab.methods.distill import Distill
from diffusion_lab.modules.diffusion_module import DiffusionModule
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import compose_cfg


# ---- the math ---------------------------------------------------------------------------------
def test_vp_grid_is_lcms_and_its_boundary_scalings():
    grid = C.vp_grid(DDPMScheduler(num_train_timesteps=1000), 50)
    assert grid.timestep[:3].tolist() == [19, 39, 59] and grid.timestep[-1] == 999
    assert grid.prev_timestep[:3].tolist() == [0, 19, 39]
    # LCM's boundary scalings (timestep_scaling 10, sigma_data 0.5), by hand: c_skip(0) = 1, c_out(0) = 0
    t = 19 * 10.0
    assert grid.c_skip[0].item() == pytest.approx(0.25 / (t**2 + 0.25))
    assert grid.c_out[0].item() == pytest.approx(t / math.sqrt(t**2 + 0.25))
    assert grid.prev_c_skip[0].item() == 1.0 and grid.prev_c_out[0].item() == 0.0
    # the student's sampler (LCMScheduler) visits points of the grid it was distilled on
    for n in (1, 2, 4):
        lcm = LCMScheduler.from_config(DDPMScheduler().config)
        lcm.set_timesteps(n)
        assert set(lcm.timesteps.tolist()) <= set(grid.timestep.tolist())


def test_vp_solver_step_is_ddim():
    sched = DDPMScheduler(num_train_timesteps=1000)
    grid = C.vp_grid(sched, 50)
    torch.manual_seed(0)
    x_t, eps_hat = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    idx = torch.tensor([1, 10, 49])
    g = grid.at(idx, "cpu")
    process = VPProcess(sched, prediction_type="epsilon")
    x0_hat = C.predict_x0(process, eps_hat, x_t, g.timestep, g.sigma)
    torch.testing.assert_close(C.implied_eps(x_t, x0_hat, g.alpha, g.sigma), eps_hat, atol=1e-4, rtol=1e-4)
    ours = C.noisy(x0_hat, eps_hat, g.prev_alpha, g.prev_sigma)
    ddim = DDIMScheduler.from_config(sched.config, clip_sample=False)
    ddim.set_timesteps(50)  # prev = t - 20
    for i in range(3):
        ref = ddim.step(eps_hat[i : i + 1], int(g.timestep[i]), x_t[i : i + 1], eta=0.0).prev_sample
        torch.testing.assert_close(ours[i : i + 1], ref, atol=1e-5, rtol=1e-4)


def test_flow_grid_solver_step_and_sampler_step():
    grid = C.flow_grid(FlowMatchEulerDiscreteScheduler(shift=3.0), 4)
    s = torch.tensor([0.25, 0.5, 0.75, 1.0])
    torch.testing.assert_close(grid.sigma, 3 * s / (1 + 2 * s))  # SD3's shift, by hand
    torch.testing.assert_close(grid.prev_sigma[1:], grid.sigma[:-1])
    assert grid.prev_sigma[0] == 0 and torch.equal(grid.timestep, grid.sigma * 1000)
    assert torch.all(grid.c_skip == 0) and torch.all(grid.c_out == 1)  # x0_hat = x - sigma v meets f(x, 0) = x
    # the DDIM step of a flow model is its Euler step x + (sigma' - sigma) v ...
    torch.manual_seed(0)
    x, v = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    process = FlowMatchingProcess(FlowMatchEulerDiscreteScheduler())
    sigma, prev = torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.0])
    x0 = C.predict_x0(process, v, x, sigma * 1000, sigma)
    step = C.noisy(x0, C.implied_eps(x, x0, 1 - sigma, sigma), 1 - prev, prev)
    torch.testing.assert_close(step, x + (prev - sigma).view(-1, 1, 1, 1) * v)
    # ... and the step the student samples with (sampler=lcm), on the grid 1 -> 1/2 -> 0
    sampler = load_sampler("lcm").scheduler(FlowMatchEulerDiscreteScheduler())
    sampler.set_timesteps(2)
    torch.testing.assert_close(sampler.sigmas, torch.tensor([0.999, 0.4995, 0.0]), atol=1e-6, rtol=0)
    out = sampler.step(v, sampler.timesteps[0], x).prev_sample
    s0, s1 = sampler.sigmas[0], sampler.sigmas[1]
    torch.testing.assert_close(out, x + (s1 - s0) * v, atol=1e-5, rtol=1e-5)


def test_pseudo_huber_by_hand():
    pred, target = torch.tensor([0.0, 3.0]), torch.tensor([4.0, 3.0])
    assert C.consistency_loss(pred, target, "huber", huber_c=3.0).item() == pytest.approx(((5 - 3) + 0) / 2)
    assert C.consistency_loss(pred, target, "l2").item() == pytest.approx(8.0)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="method.loss"):
        Distill(loss="l1")
    with pytest.raises(ConfigError, match="method.target_decay"):
        Distill(target_decay=1.0)


# ---- a toy problem the distilled student must solve better than the teacher in 2 steps ----------
class ExactDenoiser(torch.nn.Module):
    """The exact network of data = ``points`` ``[K, 1, 2, 2]`` (flow: velocity; vp: epsilon), from the
    posterior mean E[x0 | x_t]; plus a zero-initialised MLP, so the student starts as the teacher."""

    def __init__(self, points: torch.Tensor, kind: str, alphas_cumprod: torch.Tensor | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.register_buffer("points", points)
        if alphas_cumprod is not None:
            self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        d = points[0].numel()
        self.residual = torch.nn.Sequential(torch.nn.Linear(d + 1, 128), torch.nn.SiLU(), torch.nn.Linear(128, 128), torch.nn.SiLU(), torch.nn.Linear(128, d))
        torch.nn.init.zeros_(self.residual[-1].weight)
        torch.nn.init.zeros_(self.residual[-1].bias)
        self.config = SimpleNamespace(in_channels=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        t = t.to(x.device).float().expand(len(x))
        if self.kind == "flow_matching":
            sigma = (t / 1000).clamp(min=1e-4)
            alpha = 1 - sigma
        else:
            a = self.alphas_cumprod[t.long()]
            alpha, sigma = a.sqrt(), (1 - a).sqrt()
        flat, pts = x.flatten(1), self.points.flatten(1)
        logits = -((flat[:, None] - alpha[:, None, None] * pts[None]) ** 2).sum(-1) / (2 * sigma[:, None] ** 2)
        x0 = (logits.softmax(-1) @ pts).view_as(x)
        s = sigma.view(-1, 1, 1, 1)
        exact = (x - x0) / s if self.kind == "flow_matching" else (x - alpha.view(-1, 1, 1, 1) * x0) / s
        extra = self.residual(torch.cat([flat, t[:, None] / 1000], 1)).view_as(x)
        return SimpleNamespace(sample=exact + extra)


def _toy_module(kind: str, lcm_grid: int = 10) -> DiffusionModule:
    points = torch.tensor([[0.8, 0.8, -0.8, -0.8], [-0.8, 0.8, 0.8, -0.8], [0.0, -0.8, 0.0, 0.8]]).view(3, 1, 2, 2)
    if kind == "flow_matching":
        process, alphas = FlowMatchingProcess(FlowMatchEulerDiscreteScheduler(), density="uniform"), None
    else:
        process = VPProcess(DDPMScheduler(beta_schedule="squaredcos_cap_v2"), prediction_type="epsilon")
        alphas = process.scheduler.alphas_cumprod
    method = Distill(num_solver_steps=10, loss="l2", target_decay=0.9, num_inference_steps=2)  # a coarse grid distills fast
    sampler = load_sampler("lcm")
    sampler.options["vp"] = {"original_inference_steps": lcm_grid}  # LCMScheduler samples on the grid distilled on
    return DiffusionModule(
        ExactDenoiser(points, kind, alphas), process, sampler, partial(torch.optim.Adam, lr=3e-3),
        codec=IdentityCodec(1), resolution=2, val_buckets=0, method=method,
    )


def test_vp_student_and_lcm_scheduler_must_share_the_grid():
    module = _toy_module("vp", lcm_grid=50)  # distilled on 10 points, sampled on LCMScheduler's 50
    with pytest.raises(ConfigError, match="original_inference_steps=10"):
        module.method.setup(module)


def _nearest_distance(samples: torch.Tensor, points: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(mean distance of each sample to its nearest data point, how many samples each point is nearest to)."""
    d = torch.cdist(samples.flatten(1), points.flatten(1))
    return d.min(1).values.mean().item(), torch.bincount(d.argmin(1), minlength=len(points))


@pytest.mark.parametrize("kind", ["flow_matching", "vp"])
def test_distilled_student_beats_the_teacher_at_two_steps(kind):
    torch.manual_seed(0)
    module = _toy_module(kind)
    points = module.base_backbone.points
    noise = torch.randn(512, 1, 2, 2, generator=torch.Generator().manual_seed(1))

    def two_steps():
        return module.generate(512, 2, noise=noise, generator=torch.Generator().manual_seed(2))

    teacher, _ = _nearest_distance(two_steps(), points)
    data = [{"pixel_values": points[i % len(points)]} for i in range(4096)]
    trainer = pl.Trainer(max_steps=300, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=64, shuffle=True))
    student, counts = _nearest_distance(two_steps(), points)
    # measured: flow 0.45 vs 0.62, vp 0.40 vs 0.64 (the teacher's 2-step samples are blends of the points)
    assert student < 0.8 * teacher, (student, teacher)
    assert counts.min() > 0.1 * len(noise), counts  # every mode kept: no collapse onto one point


# ---- a real run: the export is a few-step pipeline plain diffusers loads ---------------------
@pytest.fixture
def teacher_pipeline(tmp_path) -> Path:
    """A tiny flow-matching DDPMPipeline folder, as the demo exports it (DPM-Solver++ on flow sigmas)."""
    from diffusers import DDPMPipeline, DPMSolverMultistepScheduler

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0)
    out = tmp_path / "teacher"
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out)
    return out


def test_distill_run_exports_a_two_step_pipeline(teacher_pipeline, tmp_path, capsys):
    from diffusion_lab.sample import run as run_sample
    from diffusion_lab.train import train

    overrides = [
        "experiment=distill_digits", f"model.pretrained={teacher_pipeline}", "trainer.max_steps=2", "data.batch_size=8",
        "trainer.log_every_n_steps=1", "callbacks.sample_grid.every_n_steps=2", "callbacks.sample_grid.num_images=4",
        "callbacks.progress_bar=null", "callbacks.model_checkpoint.every_n_train_steps=2",
    ]
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    _, objs = train(cfg)
    module = objs["model"]
    assert isinstance(module.method, Distill) and module.method.target is not None
    run = Path(cfg.paths.output_dir)
    assert json.loads((run / "pipeline" / "diffusion_lab.json").read_text()) == {"num_inference_steps": 2}
    # the checkpoint holds the target network and the teacher; a resume continues from both, and the
    # teacher stays the starting model (not a copy of the restored student)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert set(ckpt["diffusion_lab_method"]["target"]) == set(module.base_backbone.state_dict())
    resumed_cfg = compose_cfg("train", [*overrides, "trainer.max_steps=3", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"], tmp_path / "resumed")
    _, resumed = train(resumed_cfg)
    start = UNet2DModel.from_pretrained(teacher_pipeline / "unet").state_dict()
    teacher = resumed["model"].method.teacher.copy.state_dict()
    assert all(torch.equal(teacher[k].cpu(), v) for k, v in start.items())
    student = resumed["model"].base_backbone.state_dict()
    assert not all(torch.equal(student[k].cpu(), v) for k, v in start.items())  # the student has moved
    # plain diffusers (diffusion_lab unimportable) loads it with the few-step scheduler and samples it
    code = (
        "import sys; sys.modules['diffusion_lab'] = None\n"
        "from diffusers import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(run / 'pipeline')!r})\n"
        "c = pipe.scheduler.config\n"
        "print(type(pipe.scheduler).__name__, c.solver_order, c.use_flow_sigmas)\n"
        "print(pipe(batch_size=2, num_inference_steps=2, output_type='np').images.shape)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "DPMSolverMultistepScheduler 1 True" in res.stdout and "(2, 8, 8, 1)" in res.stdout
    # diffusion_lab.sample takes the trained step count when none is given
    out = tmp_path / "samples"
    capsys.readouterr()
    run_sample(compose_cfg("sample", [f"pipeline={run / 'pipeline'}", "num_images=2", "batch_size=2", "device=cpu", f"out_dir={out}"], out))
    assert "2 steps" in capsys.readouterr().out


def test_distill_refuses_a_many_step_sampler(teacher_pipeline, tmp_path):
    from diffusion_lab.train import train

    cfg = compose_cfg("train", ["experiment=distill_digits", f"model.pretrained={teacher_pipeline}", "sampler=dpmpp", "trainer.max_steps=1"], tmp_path / "run")
    with pytest.raises(ConfigError, match="sampler=lcm"):
        train(cfg)


def test_lcm_lora_on_a_latent_text_to_image_model(tmp_path):
    """LCM-LoRA: a tiny SD 1.x (vp, captions -> text states, guided teacher = the base with the adapter
    off); the LoRA folder records its step count and loads onto the base in plain diffusers with LCMScheduler."""
    from diffusers import StableDiffusionPipeline

    from diffusion_lab.testing import tiny
    from diffusion_lab.train import train

    base = tiny.build(tmp_path / "tiny_sd")
    overrides = [
        "experiment=sd_finetune_tiny", f"model.pretrained={base}", "method=distill", "sampler=lcm", "adapter=lora",
        "trainer.max_steps=2", "trainer.limit_val_batches=0", "data.batch_size=2", "model.preview_steps=2",
        "callbacks.sample_grid.every_n_steps=2", "callbacks.sample_grid.num_images=1", "callbacks.model_checkpoint.every_n_train_steps=2",
    ]
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    _, objs = train(cfg)
    method = objs["model"].method
    assert method.target is None and method.teacher.copy is None  # the student is its own target; teacher = adapter off
    lora = Path(cfg.paths.output_dir) / "lora"
    assert json.loads((lora / "diffusion_lab.json").read_text()) == {"num_inference_steps": 2, "guidance_scale": 1.0}  # guided teacher: unguided student
    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(lora))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    image = pipe("a handwritten digit seven", num_inference_steps=2, guidance_scale=1.0, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
