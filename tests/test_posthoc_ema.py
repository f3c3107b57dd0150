"""Post-hoc EMA (Karras et al. 2024): the profile math against closed forms and quadrature, the
reconstruction against EMAs actually run with the target profile (a synthetic trajectory and a
real Lightning run), and the CLI's export loading in plain diffusers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline

from diffusion_lab.callbacks.posthoc_ema import (
    PostHocEMACallback,
    PowerEMA,
    find_snapshots,
    load_weights,
    reconstruct,
)
from diffusion_lab.diffusion.power_ema import (
    GAMMA_AT_MAX,
    SIGMA_REL_MAX,
    beta,
    combine,
    gamma_from_sigma_rel,
    profile_dot,
    sigma_rel_from_gamma,
    solve_coefficients,
    step_weights,
)
from diffusion_lab.posthoc_ema import run as run_posthoc
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import compose_cfg


def profile(s: torch.Tensor, t: float, gamma: float) -> torch.Tensor:
    """p_{t,gamma}(s) = (gamma+1) s^gamma / t^(gamma+1) on [0, t], 0 after."""
    return torch.where(s <= t, (gamma + 1) / t * (s / t) ** gamma, torch.zeros_like(s))


def quad(f: torch.Tensor, s: torch.Tensor) -> float:
    return float(torch.trapezoid(f, s))


# ---- the math against closed forms ----------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.0, 1.0, 6.94, 16.97, 50.0])
def test_sigma_rel_is_the_relative_std_of_the_profile(gamma):
    s = torch.linspace(0, 1, 400_001, dtype=torch.float64)
    p = profile(s, 1.0, gamma)
    mean = quad(s * p, s)
    std = math.sqrt(quad((s - mean) ** 2 * p, s))
    assert quad(p, s) == pytest.approx(1.0, abs=1e-6)
    assert sigma_rel_from_gamma(gamma) == pytest.approx(std, rel=1e-5)
    assert gamma_from_sigma_rel(sigma_rel_from_gamma(gamma)) == pytest.approx(gamma, rel=1e-9, abs=1e-9)


def test_gamma_of_the_papers_widths_and_the_valid_range():
    assert gamma_from_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's two profiles
    assert gamma_from_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    assert gamma_from_sigma_rel(sigma_rel_from_gamma(0.0)) == pytest.approx(0.0, abs=1e-9)  # plain average, 0.2887
    eps = 1e-3
    assert sigma_rel_from_gamma(GAMMA_AT_MAX) > max(sigma_rel_from_gamma(GAMMA_AT_MAX - eps), sigma_rel_from_gamma(GAMMA_AT_MAX + eps))
    for bad in (0.0, -0.1, SIGMA_REL_MAX + 1e-6, 0.5):
        with pytest.raises(ValueError):
            gamma_from_sigma_rel(bad)


@pytest.mark.parametrize("gamma", [0.5, 6.94, 16.97])
def test_power_ema_weights_are_the_profile_integrated_over_each_step(gamma):
    """Running beta_t = (1 - 1/t)^(gamma+1) (the callback's EMAModel) on one-hot inputs gives the
    weight of every step; it equals (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1), the profile's integral."""
    T = 60
    theta = torch.nn.Parameter(torch.zeros(T, dtype=torch.float64))
    ema = PowerEMA([theta], gamma)
    for t in range(1, T + 1):
        assert ema.get_decay(t) == beta(t, gamma)
        with torch.no_grad():
            theta.zero_()
            theta[t - 1] = 1.0
        ema.step([theta])
    w = step_weights(T, gamma)
    torch.testing.assert_close(ema.shadow_params[0], w, rtol=1e-12, atol=1e-14)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    s = torch.linspace(0, T, 600_001, dtype=torch.float64)
    p = profile(s, T, gamma)
    for tau in (1, T // 2, T):
        inside = (s >= tau - 1) & (s <= tau)
        assert quad(p[inside], s[inside]) == pytest.approx(float(w[tau - 1]), rel=1e-4)


@pytest.mark.parametrize("t_a,g_a,t_b,g_b", [(100, 6.94, 100, 6.94), (50, 16.97, 100, 6.94), (100, 16.97, 30, 0.5), (1e5, 80.0, 7e4, 16.97)])
def test_profile_inner_product_matches_quadrature(t_a, g_a, t_b, g_b):
    s = torch.linspace(0, max(t_a, t_b), 2_000_001, dtype=torch.float64)
    numeric = quad(profile(s, t_a, g_a) * profile(s, t_b, g_b), s)
    assert float(profile_dot(t_a, g_a, t_b, g_b)) == pytest.approx(numeric, rel=1e-4)
    assert float(profile_dot(t_a, g_a, t_b, g_b)) == pytest.approx(float(profile_dot(t_b, g_b, t_a, g_a)), rel=1e-12)


def test_solve_picks_a_matching_snapshot_and_its_residual_is_the_true_misfit():
    t = torch.tensor([200.0, 400, 600, 800, 1000] * 2)
    g = torch.tensor([16.97] * 5 + [6.94] * 5)
    x, residual = solve_coefficients(t, g, 1000, 6.94)  # the target is a snapshot's own profile
    assert residual < 1e-6
    torch.testing.assert_close(x, torch.eye(10, dtype=torch.float64)[9], atol=1e-6, rtol=0)
    # a width between the kept ones: the reported residual is ||sum x_i p_i - p_r|| / ||p_r|| on a grid
    gamma_r = gamma_from_sigma_rel(0.15)
    x, residual = solve_coefficients(t, g, 1000, gamma_r)
    s = torch.linspace(0, 1000, 400_001, dtype=torch.float64)
    fit = sum(xi * profile(s, float(ti), float(gi)) for xi, ti, gi in zip(x, t, g))
    target = profile(s, 1000.0, gamma_r)
    numeric = math.sqrt(quad((fit - target) ** 2, s) / quad(target**2, s))
    assert residual == pytest.approx(numeric, rel=1e-3) and 1e-4 < residual < 0.2
    assert float(x.sum()) == pytest.approx(1.0, abs=1e-9)  # the weights of an average: constrained to sum to 1
    x_free, residual_free = solve_coefficients(t, g, 1000, gamma_r, sum_to_one=False)  # the paper's plain A x = b
    assert residual_free <= residual + 1e-12 and abs(float(x_free.sum()) - 1) > 1e-4


# ---- reconstruction vs EMAs run with the target profile ---------------------------------------
KEPT, TARGETS = (0.05, 0.10), (0.03, 0.07, 0.15, 0.2)


def test_reconstruction_matches_an_ema_run_with_the_target_profile_synthetic():
    """A noisy SGD-like trajectory (pulled towards a moving target) of 2,000 numbers over 1,000
    steps: snapshots of the two kept profiles every 25 steps reconstruct EMAs of four other widths
    to within 2% of how far those are from the nearest kept EMA (measured: < 0.4%)."""
    T, every, D = 1000, 25, 2000
    g = torch.Generator().manual_seed(0)
    theta = torch.nn.Parameter(torch.zeros(D))
    kept = [PowerEMA([theta], gamma_from_sigma_rel(s)) for s in KEPT]
    direct = {s: PowerEMA([theta], gamma_from_sigma_rel(s)) for s in TARGETS}
    snaps, steps, gammas = [], [], []
    x = torch.zeros(D)
    phase = torch.linspace(0, 6, D)
    for t in range(1, T + 1):
        x = x + 0.05 * (torch.sin(phase + t / 200) - x) + 0.1 * torch.randn(D, generator=g)
        with torch.no_grad():
            theta.copy_(x)
        for ema in kept + list(direct.values()):
            ema.step([theta])
        if t % every == 0:
            for ema in kept:
                snaps.append({"theta": ema.shadow_params[0].clone()})
                steps.append(t)
                gammas.append(ema.gamma)
    for s, ema in direct.items():
        coef, _ = solve_coefficients(torch.tensor(steps), torch.tensor(gammas), T, gamma_from_sigma_rel(s))
        rebuilt = combine(snaps, coef)["theta"]
        truth = ema.shadow_params[0]
        nearest = min((k.shadow_params[0] for k in kept), key=lambda k: float((k - truth).norm()))
        assert float((rebuilt - truth).norm()) < 0.02 * float((nearest - truth).norm()), s
        assert float((truth - theta.detach()).norm()) > 0.3 * float(truth.norm())  # the EMAs are far from the raw weights


class ReferenceEMA(PostHocEMACallback):
    """The target profiles run directly beside the callback under test (its own checkpoint key)."""

    @property
    def state_key(self) -> str:
        return "posthoc_ema_reference"


STEPS = 40
RUN = [
    "backbone=tiny", "trainer=cpu", "logger=csv", f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}",
    "trainer.limit_val_batches=1", "trainer.log_every_n_steps=10", "data.batch_size=8", "model.preview_steps=2",
    "model.optimizer.lr=3e-3", "callbacks.sample_grid=null", "callbacks.noising_strip=null", "callbacks.progress_bar=null",
    f"callbacks.model_checkpoint.every_n_train_steps={STEPS}", "callbacks.posthoc_ema.every_n_steps=4",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("posthoc") / "run"
    reference = [
        "+callbacks.reference._target_=tests.test_posthoc_ema.ReferenceEMA", f"+callbacks.reference.every_n_steps={STEPS}",
        f"+callbacks.reference.sigma_rels=[{TARGETS[1]},{TARGETS[2]}]", "+callbacks.reference.dirpath=${paths.output_dir}/reference",
    ]
    cfg = compose_cfg("train", RUN + reference, out)
    _, objects = train(cfg)
    return out, objects


def test_snapshots_written_every_n_steps_with_their_profile(trained):
    out, objects = trained
    snaps = find_snapshots(out / "ema_snapshots")
    assert [(s.sigma_rel, s.step) for s in snaps] == [(k, t) for k in KEPT for t in range(4, STEPS + 1, 4)]
    assert {s.gamma for s in snaps} == {gamma_from_sigma_rel(k) for k in KEPT}
    module = objects["model"]
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert set(snaps[0].tensors()) == set(names)
    # the last snapshot of a profile is the callback's live EMA
    cb = next(c for c in objects["trainer"].callbacks if type(c) is PostHocEMACallback)
    for ema, sigma_rel in zip(cb.emas, KEPT):
        last = next(s for s in snaps if s.sigma_rel == sigma_rel and s.step == STEPS).tensors()
        assert all(torch.equal(a, last[n]) for n, a in zip(names, ema.shadow_params))
        assert ema.optimization_step == STEPS


def test_reconstruction_matches_an_ema_run_with_the_target_profile_lightning(trained):
    """A real run of a tiny UNet: the EMA of widths 0.07 and 0.15 solved from 10 snapshots per
    kept profile vs the same EMAs run directly in the same training (the reference callback),
    within 2% of how far the nearest kept EMA is. (Without the sum-to-one constraint the error
    here is ~60% of that: the fit's sum_i x_i = 0.9975 scales the whole weights.)"""
    out, objects = trained
    snaps = find_snapshots(out / "ema_snapshots")
    raw = dict(objects["model"].named_parameters())
    for sigma_rel in TARGETS[1:3]:
        truth = next(s for s in find_snapshots(out / "reference") if s.sigma_rel == sigma_rel).tensors()
        rebuilt, report = reconstruct(snaps, sigma_rel)
        nearest = min((next(s for s in snaps if s.sigma_rel == k and s.step == STEPS).tensors() for k in KEPT),
                      key=lambda w: sum(float((w[n] - truth[n]).norm() ** 2) for n in truth))
        err = math.sqrt(sum(float((rebuilt[n] - truth[n]).norm() ** 2) for n in truth))
        gap = math.sqrt(sum(float((nearest[n] - truth[n]).norm() ** 2) for n in truth))
        moved = math.sqrt(sum(float((raw[n].detach() - truth[n]).norm() ** 2) for n in truth))
        assert report["residual"] < 0.05 and len(report["snapshots"]) == 20
        assert err < 0.02 * gap < moved, (sigma_rel, err, gap, moved)  # measured: 0.3% of the gap


def test_cli_writes_a_pipeline_plain_diffusers_loads(trained, tmp_path):
    out, _ = trained
    cfg = compose_cfg("posthoc_ema", [f"run={out}", "sigma_rel=0.07"], tmp_path / "cli")
    folder = run_posthoc(cfg)
    assert folder == out / "posthoc_ema_0.07"
    pipe = DDPMPipeline.from_pretrained(folder)
    rebuilt, _ = reconstruct(find_snapshots(out / "ema_snapshots"), 0.07)
    unet = dict(pipe.unet.named_parameters())
    assert all(torch.equal(unet[n.removeprefix("backbone.")], w) for n, w in rebuilt.items())
    exported = DDPMPipeline.from_pretrained(out / "pipeline")  # the run's own export: its regular EMA
    assert any(not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), exported.unet.parameters()))
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape[0] == 2 and (images >= 0).all() and (images <= 1).all()
    report = json.loads((folder / "posthoc_ema.json").read_text())
    assert report["sigma_rel"] == 0.07 and report["step"] == STEPS and abs(sum(s["coefficient"] for s in report["snapshots"]) - 1) < 1e-9
    # an earlier step uses only the snapshots up to it
    _, early = reconstruct(find_snapshots(out / "ema_snapshots"), 0.07, step=20)
    assert max(s["step"] for s in early["snapshots"]) == 20 and len(early["snapshots"]) == 10


def test_bad_requests_are_config_errors(trained, tmp_path):
    out, objects = trained
    snaps = find_snapshots(out / "ema_snapshots")
    with pytest.raises(ConfigError, match="sigma_rel=0.4"):
        reconstruct(snaps, 0.4)
    with pytest.raises(ConfigError, match="before the first"):
        reconstruct(snaps, 0.1, step=2)
    with pytest.raises(ConfigError, match="every_n_steps"):
        run_posthoc(compose_cfg("posthoc_ema", [f"run={tmp_path}"], tmp_path / "cli"))
    with pytest.raises(ConfigError, match="do not match"):
        load_weights(objects["model"], {"unet.nope": torch.zeros(1)})
    with pytest.raises(ConfigError, match="two different widths"):
        PostHocEMACallback(str(tmp_path), every_n_steps=5, sigma_rels=[0.1])
    with pytest.raises(ConfigError, match="sigma_rels"):
        PostHocEMACallback(str(tmp_path), every_n_steps=5, sigma_rels=[0.1, 0.5])


def test_steps_past_the_last_snapshot_are_refused_and_each_step_gets_its_own_folder(trained, tmp_path):
    """#29 item 5: step=5000 after a 40-step run was accepted (an EMA "at step 5000"), and two calls
    with different step= both wrote <run>/posthoc_ema_0.1, the second replacing the first."""
    out, _ = trained
    snaps = find_snapshots(out / "ema_snapshots")
    with pytest.raises(ConfigError, match=r"step=5000 is after the last post-hoc EMA snapshot \(the snapshots cover steps 4 to 40\)"):
        reconstruct(snaps, 0.1, step=5000)
    with pytest.raises(ConfigError, match="step=5000"):
        run_posthoc(compose_cfg("posthoc_ema", [f"run={out}", "sigma_rel=0.1", "step=5000"], tmp_path / "cli"))
    assert not (out / "posthoc_ema_0.1_step5000").exists() and not (out / "posthoc_ema_0.1").exists()
    at_20 = run_posthoc(compose_cfg("posthoc_ema", [f"run={out}", "sigma_rel=0.1", "step=20"], tmp_path / "cli"))
    at_32 = run_posthoc(compose_cfg("posthoc_ema", [f"run={out}", "sigma_rel=0.1", "step=32"], tmp_path / "cli"))
    assert (at_20, at_32) == (out / "posthoc_ema_0.1_step20", out / "posthoc_ema_0.1_step32")
    assert [json.loads((f / "posthoc_ema.json").read_text())["step"] for f in (at_20, at_32)] == [20, 32]
    # the same call again rewrites its own folder; another step into it is refused, the export kept
    assert run_posthoc(compose_cfg("posthoc_ema", [f"run={out}", "sigma_rel=0.1", "step=20"], tmp_path / "cli")) == at_20
    with pytest.raises(ConfigError, match=rf"out_dir={at_20} already holds the post-hoc EMA of sigma_rel 0.1 at step 20"):
        run_posthoc(compose_cfg("posthoc_ema", [f"run={out}", "sigma_rel=0.1", "step=32", f"out_dir={at_20}"], tmp_path / "cli"))
    assert json.loads((at_20 / "posthoc_ema.json").read_text())["step"] == 20


def test_resume_continues_the_profiles_and_refuses_a_checkpoint_without_them(trained, tmp_path):
    out, _ = trained
    ckpt = out / "checkpoints" / "last.ckpt"
    cfg = compose_cfg("train", [*RUN, f"trainer.max_steps={STEPS + 2}", f"ckpt_path={ckpt}"], tmp_path / "resumed")
    _, objects = train(cfg)
    cb = next(c for c in objects["trainer"].callbacks if type(c) is PostHocEMACallback)
    assert [e.optimization_step for e in cb.emas] == [STEPS + 2] * 2
    assert [s.step for s in find_snapshots(tmp_path / "resumed" / "ema_snapshots")] == [STEPS + 2] * 2  # the final one
    # a checkpoint of a run that kept no post-hoc EMA: its profiles would miss the first steps
    saved = torch.load(ckpt, weights_only=False)
    del saved["callbacks"]["posthoc_ema"]
    torch.save(saved, tmp_path / "no_posthoc.ckpt")
    cfg = compose_cfg("train", [*RUN, f"trainer.max_steps={STEPS + 2}", f"ckpt_path={tmp_path / 'no_posthoc.ckpt'}"], tmp_path / "bad")
    with pytest.raises(ConfigError, match="first step"):
        train(cfg)


def test_off_by_default_keeps_nothing(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_cfg("train", ["backbone=tiny"], tmp_path)
    assert cfg.callbacks.posthoc_ema.every_n_steps == 0
    cb = instantiate(cfg.callbacks.posthoc_ema)
    cb.setup(None, instantiate(cfg.model), "fit")
    assert not cb.enabled and cb.emas == [] and cb.state_dict() == {}
    assert not Path(cfg.callbacks.posthoc_ema.dirpath).exists()
