"""The diffusion math against diffusers' own implementations."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffusion_lab.diffusion import objectives as obj


@pytest.fixture(params=["linear", "squaredcos_cap_v2"])
def scheduler(request):
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=request.param)


def _data(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 3, 8, 8, generator=g)
    noise = torch.randn(n, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 250, 700, 999])[:n]
    return x0, noise, t


def test_v_target_matches_get_velocity(scheduler):
    x0, noise, t = _data()
    v = obj.training_target(scheduler, x0, noise, t, "v_prediction")
    torch.testing.assert_close(v, scheduler.get_velocity(x0, noise, t))
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_targets_recover_x0(scheduler, prediction_type):
    """The exact target fed back through predict_x0 must give x0 back."""
    x0, noise, t = _data()
    x_t = scheduler.add_noise(x0, noise, t)
    target = obj.training_target(scheduler, x0, noise, t, prediction_type)
    torch.testing.assert_close(obj.predict_x0(scheduler, target, x_t, t, prediction_type), x0, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_predict_x0_matches_scheduler_step(cls, prediction_type):
    sched = cls(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 3, 8, 8, generator=g)
    out = torch.randn(2, 3, 8, 8, generator=g)
    for t in sched.timesteps[[0, 10, 30, -1]]:
        ours = obj.predict_x0(sched, out, x_t, t.repeat(2), prediction_type)
        theirs = sched.step(out, t, x_t).pred_original_sample
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_snr_is_alpha_over_sigma(scheduler):
    t = torch.tensor([0, 500, 999])
    a = scheduler.alphas_cumprod[t]
    torch.testing.assert_close(obj.snr(scheduler, t), a / (1 - a))


def test_min_snr_weights(scheduler):
    t = torch.arange(0, 1000, 37)
    s = obj.snr(scheduler, t)
    gamma = 5.0
    w_eps = obj.loss_weights(scheduler, t, "min_snr", "epsilon", gamma)
    w_v = obj.loss_weights(scheduler, t, "min_snr", "v_prediction", gamma)
    w_x0 = obj.loss_weights(scheduler, t, "min_snr", "sample", gamma)
    torch.testing.assert_close(w_eps, torch.minimum(s, torch.tensor(gamma)) / s)
    # all three express the same x0-space weight min(SNR, gamma)
    torch.testing.assert_close(w_eps * s, w_x0)
    torch.testing.assert_close(w_v * (s + 1), w_x0)
    assert torch.all(w_eps[s > gamma] < 1) and torch.allclose(w_eps[s <= gamma], torch.ones(1))
    assert torch.equal(obj.loss_weights(scheduler, t, "none", "epsilon"), torch.ones(len(t)))


def test_offset_noise_adds_per_channel_constant():
    noise = torch.zeros(4, 3, 8, 8)
    out = obj.add_offset_noise(noise, 0.1, generator=torch.Generator().manual_seed(0))
    assert out.shape == noise.shape and not torch.equal(out, noise)
    assert torch.allclose(out, out[:, :, :1, :1].expand_as(out))  # constant over H, W
    assert noise.abs().sum() == 0  # caller's tensor untouched
    assert obj.add_offset_noise(noise, 0.0) is noise


def test_weighted_loss():
    a, b = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    assert obj.diffusion_loss(a, b).item() == pytest.approx(1.0)
    assert obj.diffusion_loss(a, b, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)


def test_bad_prediction_type():
    with pytest.raises(ValueError, match="prediction_type"):
        obj.training_target(DDPMScheduler(), torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long), "x0")
