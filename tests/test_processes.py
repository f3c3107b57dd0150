"""The three diffusion processes and the samplers, against the diffusers quantities they mirror."""

from __future__ import annotations


import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_loss_weighting_for_sd3
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_lab.diffusion import edm, flow
from diffusion_lab.diffusion.sampling import load_sampler, process_kind, sample
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import TINY, compose_cfg


def _process(name: str, **overrides):
    """``process=<name>`` composed as the CLI composes it, with ``process.<key>=<value>`` overrides."""
    cfg = compose_cfg("noising", [f"process={name}"], "/tmp")
    return instantiate(OmegaConf.merge(cfg.process, overrides))


def _data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g).clamp(-1, 1), torch.randn(n, 3, 8, 8, generator=g)


# ---- flow matching ----------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_noising_is_the_schedulers_scale_noise(shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    x0, noise = _data()
    sigma, t = flow.sample_sigmas(sched, len(x0), "logit_normal", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(flow.noisy(x0, noise, sigma), sched.scale_noise(x0, t, noise))
    torch.testing.assert_close(t, sigma * 1000)  # the network is told sigma * num_train_timesteps
    # the exact velocity takes x_sigma back to x_0
    torch.testing.assert_close(flow.predict_x0(flow.target(x0, noise), flow.noisy(x0, noise, sigma), sigma), x0)


def test_flow_densities_and_shift():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = FlowMatchEulerDiscreteScheduler(shift=1.0)
    shifted = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s_ln, _ = flow.sample_sigmas(plain, 20000, "logit_normal", generator=g())
    s_u, _ = flow.sample_sigmas(plain, 20000, "uniform", generator=g())
    s_shift, _ = flow.sample_sigmas(shifted, 20000, "logit_normal", generator=g())
    assert abs(s_ln.median() - 0.5) < 0.02 and abs(s_u.mean() - 0.5) < 0.02
    assert s_ln.std() < s_u.std()  # logit-normal concentrates on the middle of the path
    assert s_shift.median() > 0.7  # shift 3 moves training towards noise: 3*0.5/(1+2*0.5) = 0.75
    assert 0 < s_ln.min() and s_ln.max() <= 1


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_flow_loss_weights_are_diffusers(weighting):
    sigma = torch.tensor([0.05, 0.3, 0.5, 0.9])
    torch.testing.assert_close(flow.loss_weights(weighting, sigma), compute_loss_weighting_for_sd3(weighting, sigma))


# ---- EDM ----------------------------------------------------------------------------------------
def test_edm_preconditioning_matches_the_paper():
    sched = EDMEulerScheduler()
    sd = sched.config.sigma_data
    x0, noise = _data()
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 10.0, 80.0])
    x = edm.noisy(x0, noise, sigma)
    model_in, c_noise = edm.model_inputs(sched, x, sigma)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(model_in, x / (s**2 + sd**2).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    # the effective target F* = (x_0 - c_skip x) / c_out (EDM eq. 8) denoises exactly
    f_star = (x0 - c_skip * x) / c_out
    torch.testing.assert_close(edm.denoised(sched, x, f_star, sigma), x0, atol=1e-4, rtol=1e-4)
    # lambda(sigma) * c_out^2 = 1: the D-space loss is an unweighted F-space loss
    torch.testing.assert_close(edm.loss_weight(sigma, sd) * c_out.flatten() ** 2, torch.ones(6))


def test_edm_sigma_density_is_log_normal():
    s = edm.sample_sigmas(20000, -1.2, 1.2, generator=torch.Generator().manual_seed(0))
    assert abs(s.log().mean() + 1.2) < 0.03 and abs(s.log().std() - 1.2) < 0.03


# ---- processes ----------------------------------------------------------------------------------
def _perfect_output(process, x0, noised):
    """What a perfect network outputs for this batch (its exact training target in output space)."""
    if process.kind == "edm":
        s = noised.sigma.view(-1, 1, 1, 1)
        sd = process.sigma_data
        return (x0 - sd**2 / (s**2 + sd**2) * noised.x_t) / (s * sd / (s**2 + sd**2).sqrt())
    return noised.target


@pytest.mark.parametrize("name", ["vp", "flow_matching", "edm"])
def test_process_loss_is_zero_for_the_exact_target_and_fixed_by_a_generator(name):
    process = _process(name)
    x0, _ = _data(16)
    a = process.noised(x0, generator=torch.Generator().manual_seed(3))
    b = process.noised(x0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.model_input, b.model_input) and torch.equal(a.timestep, b.timestep)
    assert process.loss(_perfect_output(process, x0, a), a).item() < 1e-6
    assert process.loss(torch.zeros_like(x0), a).item() > 1e-2
    torch.testing.assert_close(process.predict_x0(_perfect_output(process, x0, a), a), x0, atol=2e-3, rtol=1e-3)
    assert a.level.min() >= 0 and a.level.max() <= 1


def test_offset_noise_of_validation_comes_from_the_generator():
    """Regression: the offset used the global RNG, so val/loss moved from run to run."""
    process = _process("vp", offset_noise=0.1)
    x0, _ = _data(4)
    a = process.noised(x0, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    b = process.noised(x0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.x_t, b.x_t)


def test_vp_zero_terminal_snr_and_its_errors():
    p = _process("vp", zero_terminal_snr=True, prediction_type="v_prediction")
    assert p.scheduler.alphas_cumprod[-1] < 1e-6 and p.scheduler.config.timestep_spacing == "trailing"
    ddim = p.sampling_scheduler(load_sampler("ddim"))
    ddim.set_timesteps(10)
    assert int(ddim.timesteps[0]) == 999  # sampling starts at SNR 0
    with pytest.raises(Exception, match=r"process.zero_terminal_snr=true.*process.prediction_type=v_prediction"):
        _process("vp", zero_terminal_snr=True)  # (Hydra wraps the ConfigError; the CLI unwraps it)
    with pytest.raises(ConfigError, match="sampler=pndm"):
        p.sampling_scheduler(load_sampler("pndm"))


def test_vp_prediction_type_and_the_saved_sampler_class():
    p = _process("vp_sd", prediction_type="v_prediction")
    assert type(p.scheduler) is DDPMScheduler and p.prediction_type == "v_prediction"
    default = p.sampling_scheduler(load_sampler("default"))
    assert type(default).__name__ == "PNDMScheduler" and default.config.prediction_type == "v_prediction"
    torch.testing.assert_close(default.alphas_cumprod, p.scheduler.alphas_cumprod)


# ---- samplers -----------------------------------------------------------------------------------
def test_sampler_classes_per_process():
    vp, fm, ed = _process("vp"), _process("flow_matching", scheduler={"shift": 3.0}), _process("edm")
    dpmpp = load_sampler("dpmpp")
    assert type(vp.sampling_scheduler(dpmpp)).__name__ == "DPMSolverMultistepScheduler"
    flow_dpm = fm.sampling_scheduler(dpmpp)
    assert flow_dpm.config.use_flow_sigmas and flow_dpm.config.flow_shift == 3.0 and flow_dpm.config.prediction_type == "flow_prediction"
    assert type(ed.sampling_scheduler(dpmpp)).__name__ == "EDMDPMSolverMultistepScheduler"
    assert type(fm.sampling_scheduler(load_sampler("default"))) is FlowMatchEulerDiscreteScheduler
    assert [process_kind(p.scheduler) for p in (vp, fm, ed)] == ["vp", "flow_matching", "edm"]
    assert process_kind(flow_dpm) == "flow_matching"


@pytest.mark.parametrize("process,sampler", [("flow_matching", "ddim"), ("edm", "pndm"), ("vp", "flow_euler"), ("flow_matching", "edm_euler")])
def test_a_sampler_that_cannot_run_the_process_names_both_keys(process, sampler):
    with pytest.raises(ConfigError, match=rf"sampler={sampler} cannot sample a model trained with process={process}"):
        _process(process).sampling_scheduler(load_sampler(sampler))


def _oracle(process, c: torch.Tensor):
    """The exact network for data that is always the image ``c``: each process's own parametrisation
    of E[x_0 | x_t] = c, read from the timestep the sampler hands over."""
    sched = process.scheduler

    def denoise(x, t, **_):
        if process.kind == "vp":
            a = sched.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
            if process.prediction_type == "epsilon":
                return (x - a.sqrt() * c) / (1 - a).sqrt()
            return a.sqrt() * (x - a.sqrt() * c) / (1 - a).sqrt() - (1 - a).sqrt() * c  # v = sqrt(a) eps - sqrt(1-a) x0
        if process.kind == "flow_matching":
            s = (t / process.num_train_timesteps).view(-1, 1, 1, 1)
            return (x - c) / s
        s = (4 * t).exp().view(-1, 1, 1, 1)  # c_noise = ln(sigma) / 4
        sd = process.sigma_data
        x_t = x * (s**2 + sd**2).sqrt()  # undo c_in
        return (c - sd**2 / (s**2 + sd**2) * x_t) / (s * sd / (s**2 + sd**2).sqrt())

    return denoise


@pytest.mark.parametrize(
    "process,sampler",
    [("vp", "ddim"), ("vp", "dpmpp"), ("vp", "euler"), ("vp", "unipc"), ("vp", "heun"),
     ("flow_matching", "default"), ("flow_matching", "dpmpp"), ("flow_matching", "unipc"), ("flow_matching", "heun"),
     ("edm", "default"), ("edm", "dpmpp")],
)
def test_every_sampler_lands_on_the_data_of_an_exact_network(process, sampler):
    """With the exact denoiser of a one-point data set, sampling must end at that point: this
    checks what each sampler feeds the network (timestep units, input scaling, initial sigma)."""
    overrides = {"prediction_type": "v_prediction"} if process == "vp" and sampler == "heun" else {}
    proc = _process(process, **overrides)
    c = torch.linspace(-0.8, 0.8, 3 * 8 * 8).view(1, 3, 8, 8)
    x = sample(_oracle(proc, c), proc.sampling_scheduler(load_sampler(sampler)), (2, 3, 8, 8), 20, generator=torch.Generator().manual_seed(0))
    assert (x - c).abs().max() < 0.05, (x - c).abs().max()


# ---- model families ----------------------------------------------------------------------------
@pytest.mark.parametrize("process", ["vp", "flow_matching", "edm"])
def test_noising_strip_of_every_process(process, tmp_path):
    from diffusion_lab.noising import run as run_noising
    from PIL import Image

    cfg = compose_cfg("noising", [f"process={process}", "levels=[0,0.5,1]", "num_images=2", f"out={tmp_path / 'strip.png'}"], tmp_path)
    im = Image.open(run_noising(cfg)).convert("L")
    arr = torch.tensor(list(im.getdata()), dtype=torch.float).view(im.height, im.width)[28:]
    clean, mid, noisy = arr[:, :80], arr[:, 80:160], arr[:, 160:]
    assert (clean - mid).abs().mean() < (clean - noisy).abs().mean()


def test_latent_sd_refuses_flow_matching_before_training(tmp_path):
    from diffusion_lab.testing import tiny

    folder = tiny.build(tmp_path / "tiny_sd")
    cfg = compose_cfg("train", ["experiment=sd_finetune_tiny", f"model.pretrained={folder}", "process=flow_matching"], tmp_path / "run")
    with pytest.raises(Exception, match=r"process=flow_matching cannot be used with model=latent_sd") as e:
        instantiate(cfg.model)
    assert "StableDiffusionPipeline" in str(e.value)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run per process (4 steps), exported."""
    from diffusion_lab.train import train

    runs = {}
    for process in ("vp", "flow_matching", "edm"):
        out = tmp_path_factory.mktemp(process)
        cfg = compose_cfg("train", [*TINY, f"process={process}", "callbacks.sample_grid=null"], out / "run")
        train(cfg)
        runs[process] = out / "run"
    return runs


@pytest.mark.parametrize("process,scheduler", [("vp", "DDPMScheduler"), ("flow_matching", "FlowMatchEulerDiscreteScheduler"), ("edm", "EDMEulerScheduler")])
def test_sample_and_evaluate_with_the_trained_sampler(trained, process, scheduler, tmp_path):
    """Regression (no `sampler=`): the pipeline's own scheduler, or the checkpoint's sampler, is used
    (it was "unknown scheduler 'DDIMScheduler'" / a bare KeyError)."""
    from diffusers import DDPMPipeline

    from diffusion_lab.evaluate import run as run_evaluate
    from diffusion_lab.sample import run as run_sample

    run = trained[process]
    assert type(DDPMPipeline.from_pretrained(run / "pipeline").scheduler).__name__ == scheduler
    for source in (f"pipeline={run / 'pipeline'}", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"):
        out = tmp_path / source.split("=")[0]
        grid = run_sample(compose_cfg("sample", [source, "num_inference_steps=3", "num_images=3", f"out_dir={out}"], out))
        assert grid.exists() and len(list(out.glob("0*.png"))) == 3
    res = run_evaluate(compose_cfg("evaluate", [f"pipeline={run / 'pipeline'}", "num_inference_steps=3", "num_images=20", "logger=none",
                                                "kid_subset_size=10", "kid_subsets=2", f"out_dir={tmp_path / 'eval'}"], tmp_path / "eval"))
    assert res["generated"]["scheduler"] == scheduler and res["generated"]["process"] == process
    with pytest.raises(ConfigError, match=f"cannot sample a model trained with process={process}"):
        other = "flow_euler" if process != "flow_matching" else "ddim"
        run_sample(compose_cfg("sample", [f"pipeline={run / 'pipeline'}", f"sampler={other}", f"out_dir={tmp_path / 'x'}"], tmp_path / "x"))


@pytest.mark.parametrize("process", ["vp", "flow_matching"])
def test_plain_diffusers_ddpm_pipeline_samples_what_diffusion_lab_samples(trained, process):
    """The export is a DDPMPipeline whose own __call__ gives the same images as diffusion_lab's
    sampler (vp and flow; EDM needs scale_model_input, which DDPMPipeline never calls)."""
    from diffusers import DDPMPipeline

    from diffusion_lab.diffusion.sampling import sample

    pipe = DDPMPipeline.from_pretrained(trained[process] / "pipeline")
    theirs = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np").images
    denoise = lambda x, t: pipe.unet(x, t).sample  # noqa: E731
    shape = (2, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    ours = sample(denoise, type(pipe.scheduler).from_config(pipe.scheduler.config), shape, 5, generator=torch.Generator().manual_seed(0))
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - theirs).max() < 1e-4
