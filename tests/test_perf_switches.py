"""Each speed switch does what it says (not how fast: experiments/bench measures that):
channels_last weights, the attention kernel really run, fused AdamW, data loader settings,
identical cached latents/text states, frozen parts in bf16, FLOP counting for MFU."""

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import open_dict
from torch.utils.data import Subset

from diffusion_lab.components import speed
from diffusion_lab.testing import tiny
from diffusion_lab.testing.tiny import tiny_unet
from diffusion_lab.data.caching import cache_latents
from diffusion_lab.metrics import profiling
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import TINY, compose_cfg

LATENT = ["model=latent_sd", "vae=tiny", "text_encoder=tiny", "backbone=sd_tiny", "process=vp_sd", "data=digits_captioned", "data.resolution=16", "logger=csv"]


def build_model(tmp_path, *overrides, base=TINY):
    torch.manual_seed(0)  # same random init for every variant
    return instantiate(compose_cfg("train", base + list(overrides), tmp_path).model)


def pixel_inputs(n=2, size=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, size, size, generator=g), torch.tensor([10, 500])


def test_channels_last_puts_conv_weights_in_nhwc_with_the_same_outputs(tmp_path):
    plain, nhwc = build_model(tmp_path), build_model(tmp_path, "model.channels_last=true")
    convs = [m.weight for m in nhwc.backbone.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1 and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    assert not any(m.weight.is_contiguous(memory_format=torch.channels_last) for m in plain.backbone.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1 and m.kernel_size != (1, 1))
    x, t = pixel_inputs()
    with torch.no_grad():
        torch.testing.assert_close(nhwc.denoise(x, t), plain.denoise(x, t), atol=1e-5, rtol=1e-4)


def test_attention_switch_sets_the_processor_and_the_kernel_that_runs(tmp_path):
    sdpa, eager = build_model(tmp_path), build_model(tmp_path, "model.attention=eager")
    x, t = pixel_inputs()
    # sdpa is diffusers' default processor, and F.scaled_dot_product_attention is what runs
    assert speed.attention_processors(sdpa.backbone) == {"AttnProcessor2_0"}
    kernels = profiling.attention_kernels(lambda: sdpa.denoise(x, t))
    assert sum(kernels.values()) == len(speed.attention_modules(sdpa.backbone)) and all("scaled_dot_product" in k for k in kernels)
    assert speed.attention_processors(eager.backbone) == {"AttnProcessor"}
    assert not profiling.attention_kernels(lambda: eager.denoise(x, t))
    with torch.no_grad():
        torch.testing.assert_close(eager.denoise(x, t), sdpa.denoise(x, t), atol=1e-5, rtol=1e-4)
    # the SD UNet's self- and cross-attention blocks switch too
    unet = tiny_unet()
    speed.set_attention(unet, "eager")
    assert speed.attention_processors(unet) == {"AttnProcessor"} and len(speed.attention_modules(unet)) == 8  # self + cross in 4 transformers
    with pytest.raises(ConfigError, match="model.attention='flash'"):
        speed.set_attention(unet, "flash")


def test_fused_adamw_is_the_optimizer_that_trains(train_cfg):
    assert train_cfg().model.optimizer.fused is False  # off by default
    _, objects = train(train_cfg("debug=fast", "model.optimizer.fused=true"))
    optimizer = objects["trainer"].optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    assert all(len(optimizer.state[p]) for p in objects["model"].backbone.parameters())  # it stepped every weight


def test_fused_adamw_step_matches_the_default_one(tmp_path):
    models = [build_model(tmp_path), build_model(tmp_path, "model.optimizer.fused=true")]
    x, t = pixel_inputs()
    for model in models:
        optimizer = model.optimizer_factory(params=model.trainable_parameters())
        model.denoise(x, t).square().mean().backward()
        optimizer.step()
    for a, b in zip(models[0].backbone.parameters(), models[1].backbone.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_worker_and_pinned_memory_switches_reach_the_data_loader(tmp_path):
    cfg = compose_cfg("train", TINY + ["data.num_workers=2", "data.pin_memory=true", "data.persistent_workers=true"], tmp_path)
    datamodule = instantiate(cfg.data.datamodule)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers) == (2, True, True)
    default = instantiate(compose_cfg("train", TINY, tmp_path).data.datamodule)
    default.setup("fit")
    assert (default.train_dataloader().pin_memory, default.train_dataloader().num_workers) == (False, 0)


def test_cache_holds_exactly_the_latents_and_text_states_of_the_frozen_parts(tmp_path):
    cfg = compose_cfg("train", LATENT + ["model.cache=true"], tmp_path)
    model = instantiate(cfg.model)
    dataset = Subset(instantiate(cfg.data.datamodule.dataset), range(12))
    cached = cache_latents(dataset, model.codec.moments, model.conditioner, "cpu", batch_size=5)
    assert len(cached) == 12 and len(cached.states) == len({dataset[i]["caption"] for i in range(12)})  # one per distinct caption
    images = torch.stack([dataset[i]["pixel_values"] for i in range(12)])
    captions = [dataset[i]["caption"] for i in range(12)]
    with torch.no_grad():
        torch.testing.assert_close(torch.stack([cached[i]["latent_moments"] for i in range(12)]), model.codec.moments(images), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(torch.stack([cached[i]["encoder_hidden_states"] for i in range(12)]), model.conditioner(captions), atol=1e-6, rtol=1e-5)
    # the training step reads a cached batch like an uncached one
    batch = torch.utils.data.default_collate([cached[i] for i in range(4)])
    assert set(batch) == {"latent_moments", "caption", "encoder_hidden_states"}
    assert torch.isfinite(model.diffusion_loss(batch))


def test_frozen_vae_and_text_encoder_in_bf16_while_the_unet_trains_in_fp32(tmp_path):
    model = build_model(tmp_path, "vae.dtype=bfloat16", "text_encoder.dtype=bfloat16", base=LATENT)
    assert {p.dtype for p in model.codec.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.conditioner.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.backbone.parameters()} == {torch.float32}
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    batch = {"pixel_values": images, "caption": ["a handwritten digit one", "a handwritten digit two"]}
    model.diffusion_loss(batch).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.codec.parameters())
    assert model.codec.moments(images).dtype == torch.float32  # the parts hand fp32 on to the UNet


def test_flop_counter_counts_the_cpu_attention_kernel(tmp_path):
    """MFU's numerator: the CPU flash kernel is counted like the math path (bmm), not dropped."""
    unet = tiny_unet()
    x, t, states = torch.randn(2, 4, 8, 8), torch.tensor([1, 900]), torch.randn(2, 77, 32)

    def step():
        return unet(x, t, encoder_hidden_states=states).sample.square().mean()

    sdpa = profiling.train_step_flops(step)
    speed.set_attention(unet, "eager")
    eager = profiling.train_step_flops(step)
    speed.set_attention(unet, "sdpa")
    with torch.utils.flop_counter.FlopCounterMode(display=False) as uncounted:  # torch's table alone
        step().backward()
    assert uncounted.get_total_flops() < sdpa
    assert abs(sdpa - eager) / eager < 0.05
    # one linear layer, exact: forward 2*N*I*O, backward (weight grad only) 2*N*I*O
    linear, inputs = torch.nn.Linear(8, 3, bias=False), torch.randn(5, 8)
    assert profiling.train_step_flops(lambda: linear(inputs).sum()) == 2 * (2 * 5 * 8 * 3)


def test_peak_flops_lookup():
    assert profiling.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert profiling.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert profiling.peak_bf16_flops("NVIDIA H200") == 989e12
    assert profiling.peak_bf16_flops("some CPU") is None


class GradNormAfterStep(pl.Callback):
    """Records the UNet's gradient norm after each step (as clipped; zeroed only at the next step)."""

    norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad for p in pl_module.backbone.parameters() if p.grad is not None]
        self.norms.append(float(torch.nn.utils.get_total_norm(grads)))


def test_fused_adamw_clips_gradients_under_bf16_mixed(train_cfg):
    """Lightning's mixed-precision plugin refuses to clip for any fused optimizer (for fp16's
    loss scaler); under bf16 the switch still clips, to trainer.gradient_clip_val."""
    GradNormAfterStep.norms = []
    cfg = train_cfg("debug=fast", "model.optimizer.fused=true", "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1e-3")
    with open_dict(cfg):
        cfg.callbacks.probe = {"_target_": f"{__name__}.GradNormAfterStep"}
    _, objects = train(cfg)
    assert objects["trainer"].optimizers[0].defaults["fused"] is True
    assert GradNormAfterStep.norms and all(0 < n <= 1e-3 * 1.01 for n in GradNormAfterStep.norms)


def test_forward_flops_of_a_linear_layer_are_exact():
    linear, inputs = torch.nn.Linear(8, 3, bias=False), torch.randn(5, 8)
    assert profiling.forward_flops(lambda: linear(inputs)) == 2 * 5 * 8 * 3


def test_sd15_split_fixture_has_sd15s_vae_to_unet_cost_ratio(tmp_path):
    """The benchmark's tiny SD: VAE encoder FLOPs / UNet training-step FLOPs near SD 1.5's 0.46
    (experiments/bench/results/sd15_flops.json); the test fixture's is far below it."""
    unet = tiny_unet(sample_size=8)
    latents, t, states = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    unet_step = profiling.train_step_flops(lambda: unet(latents, t, encoder_hidden_states=states).sample.square().mean())

    def vae_ratio(vae) -> float:
        return profiling.forward_flops(lambda: vae.encode(torch.randn(1, 3, 16, 16))) / unet_step

    assert 0.35 < vae_ratio(tiny.tiny_vae(**tiny.SD15_SPLIT_VAE)) < 0.55
    assert vae_ratio(tiny.tiny_vae()) < 0.15
    out = tiny.build(tmp_path / "split", vae_kwargs=tiny.SD15_SPLIT_VAE)
    import json

    config = json.loads((out / "vae" / "config.json").read_text())
    assert config["block_out_channels"] == [32, 64] and config["layers_per_block"] == 2


@pytest.mark.slow  # minutes of multi-process or wheel work: make test-slow
def test_benchmark_harness_quick_run_writes_its_table(tmp_path):
    """experiments/bench/bench.py end to end (a few steps of each family on CPU): JSON + markdown
    with the overhead, fixed cost per step and the FLOP split of what caching removes."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "bench.py"
    cmd = [sys.executable, str(script), "--quick", "--families", "pixel", "fixed_cost", "latent", "--only", "fused", "latent", "--no-memory-probe", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    result = json.loads((tmp_path / "cpu_quick.json").read_text())
    families = result["families"]
    assert set(families["pixel"]["cases"]) == {"framework (Lightning)", "plain PyTorch loop", "fused AdamW"}
    assert set(families["latent"]["cases"]) == {"framework (Lightning), no cache", "plain PyTorch loop, no cache", "latent + text caching", "fused AdamW"}
    assert set(families["fixed_cost"]["cases"]) == {"framework (Lightning)", "plain PyTorch loop"}
    assert all(v > 0 for fam in families.values() for c in fam["cases"].values() for v in c["images_per_s"])
    split = families["latent"]["flops_split"]
    assert split["caching_bound"] == pytest.approx(sum(v for k, v in split.items() if k != "caching_bound") / split["unet_train_step"])
    assert 1.3 < split["caching_bound"] < 1.6  # the SD-1.5-split fixture
    table = (tmp_path / "cpu_quick.md").read_text()
    assert "Framework overhead vs the plain loop" in table and "CPU-ms per step" in table and "caching can save at most" in table


@pytest.mark.slow  # minutes of multi-process or wheel work: make test-slow
def test_benchmark_memory_probe_measures_each_case_in_a_fresh_process(tmp_path):
    """On CPU the peak-memory column comes from one fresh process per case (the benchmark process
    reuses freed memory): a positive number of MiB for the framework and the plain loop."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "bench.py"
    cmd = [sys.executable, str(script), "--quick", "--families", "fixed_cost", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    cases = json.loads((tmp_path / "cpu_quick.json").read_text())["families"]["fixed_cost"]["cases"]
    assert all(c["peak_mem_mib"] > 0 for c in cases.values()), {k: c["peak_mem_mib"] for k, c in cases.items()}
