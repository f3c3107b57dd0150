"""The memory plan (python -m diffusion_lab.plan, diffusion_lab/memory): meta-built architectures
count what the real models count, each switch moves the part it should, the CLI writes plan.json
and a budget nothing meets is one paragraph."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusion_lab.components.adapters import lora_config
from diffusion_lab.memory.architecture import backbone_counts, load_architecture, state_numel
from diffusion_lab.memory.budget import K_SAVED, Counts, Settings, Trace, breakdown
from diffusion_lab.memory.planner import Planner

ROOT = Path(__file__).resolve().parents[1]
ARCH = ROOT / "conf" / "plan" / "architecture"
SHIPPED = ["sd15", "sdxl", "sd35_medium", "sd35_large", "flux1_dev", "qwen_image"]
LORA = dict(rank=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"])


def shipped(name: str):
    return load_architecture(OmegaConf.to_container(OmegaConf.load(ARCH / f"{name}.yaml")))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_backbones_match_published_counts(name):
    """Parameters + persistent buffers (what the checkpoint holds) within 2% of the published total."""
    arch = shipped(name)
    c = backbone_counts(arch)
    assert abs((c.params + c.buffers) / arch.published_params - 1) < 0.02, (c.params + c.buffers, arch.published_params)


def test_frozen_parts_count_their_published_sizes():
    c = backbone_counts(shipped("sd35_medium"))
    assert c.frozen == {"vae": 83_819_683, "text_encoder": 123_650_304, "text_encoder_2": 694_659_840, "text_encoder_3": 4_762_310_656}


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from diffusion_lab.testing.tiny import build

    return build(tmp_path_factory.mktemp("plan") / "tiny_flux", "flux")


def test_meta_model_of_a_folder_counts_the_real_model(tiny_flux):
    """The folder's config.json built on meta counts exactly what from_pretrained loads."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import T5EncoderModel

    c = backbone_counts(load_architecture(folder=tiny_flux), lora_config(**LORA))
    real = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    assert c.params == sum(p.numel() for p in real.parameters())
    assert c.linear == sum(m.weight.numel() for m in real.modules() if type(m) is torch.nn.Linear)
    from diffusion_lab.components.adapters import add_lora

    add_lora(real, lora_config(**LORA))
    assert c.trainable_adapter == sum(p.numel() for p in real.parameters() if p.requires_grad) > 0
    assert c.frozen["vae"] == state_numel(AutoencoderKL.from_pretrained(tiny_flux, subfolder="vae"))
    assert c.frozen["text_encoder_2"] == state_numel(T5EncoderModel.from_pretrained(tiny_flux, subfolder="text_encoder_2"))


# ---- the byte math ------------------------------------------------------------------------------
COUNTS = Counts(params=1_000_000_000, buffers=0, linear=900_000_000, trainable_adapter=10_000_000, largest_block=50_000_000,
                largest_param=20_000_000, frozen={"vae": 80_000_000, "text_encoder": 120_000_000}, frozen_linear={"vae": 0, "text_encoder": 100_000_000})
TRACE = Trace(saved_1=4_000_000_000, saved_2=7_000_000_000, ckpt_1=500_000_000, ckpt_2=800_000_000)


def plan(**kw):
    return breakdown(COUNTS, TRACE, Settings(**kw))


def test_full_finetune_bytes_per_parameter():
    b = plan(precision="32-true", optimizer="adamw", fused_optimizer=True)
    assert (b.weights, b.grads, b.optimizer, b.ema) == (4e9, 4e9, 8e9, 4e9)
    assert plan(optimizer="adamw_8bit").optimizer == 2e9
    assert plan(ema="cpu").ema == 0 and plan(ema=None).ema == 0


def test_lora_shrinks_grads_and_optimizer():
    full, lora = plan(), plan(adapter=True)
    assert lora.grads == 10_000_000 * 4 < full.grads / 50
    assert lora.optimizer == 10_000_000 * 8 < full.optimizer / 50


def test_fsdp_divides_by_world_size():
    one = plan(world_size=4)
    sharded = plan(world_size=4, sharded=True)
    for part in ("weights", "grads", "optimizer", "ema"):
        assert getattr(sharded, part) == pytest.approx(getattr(one, part) / 4)
    assert sharded.gather > 0 and one.gather == 0


def test_checkpointing_shrinks_activations_and_batch_scales_them():
    assert plan(gradient_checkpointing=True).activations < plan().activations / 5
    assert plan(batch=4).activations == pytest.approx(K_SAVED * (TRACE.saved_1 + 3 * (TRACE.saved_2 - TRACE.saved_1)))


def test_quantized_base_shrinks_the_frozen_weights():
    bf16 = plan(adapter=True, base_dtype="bfloat16", precision="bf16-mixed")
    int8 = plan(adapter=True, base_dtype="bfloat16", precision="bf16-mixed", quantization="int8")
    nf4 = plan(adapter=True, base_dtype="bfloat16", precision="bf16-mixed", quantization="nf4")
    assert nf4.weights < int8.weights < bf16.weights
    assert int8.weights == pytest.approx(100_000_000 * 2 + 900_000_000 * (1 + 4 / 4096) + 10_000_000 * 4)
    te = plan(adapter=True, quantization="nf4", quantize_text_encoders=True)
    assert te.frozen < plan(adapter=True, quantization="nf4").frozen
    assert plan(offload_frozen=True).frozen == 0


def test_the_trace_saves_less_with_checkpointing_and_lora():
    arch = shipped("sd15")
    p = Planner(arch, 256, lora=lora_config(**LORA))
    full, lora = p.trace(False, "fp32"), p.trace(True, "fp32")
    assert full.ckpt_1 < full.saved_1 / 3
    assert lora.saved_1 < full.saved_1 * 0.9  # frozen convs and linears keep no inputs for a weight gradient
    assert full.saved_2 > full.saved_1 * 1.8  # per-sample activations dominate


# ---- the CLI ------------------------------------------------------------------------------------
KEYS = {"weights_gb", "grads_gb", "optimizer_gb", "ema_gb", "activations_gb", "frozen_gb", "total_gb"}


def plan_cfg(tmp_path, *overrides):
    from tests.conftest import compose_cfg

    return compose_cfg("plan", ["logger=none", *overrides], tmp_path)


def test_cli_shipped_architecture_with_budget(tmp_path, capsys):
    from diffusion_lab.memory.report import plan as run

    run(plan_cfg(tmp_path, "model=latent_flux", "plan/architecture=flux1_dev", "adapter=lora", "trainer=gpu", "data.resolution=1024",
                 "data.batch_size=1", "plan.budget_gb=24"))
    out = capsys.readouterr().out
    assert "peak per rank" in out and "paste:" in out and str(tmp_path / "plan.json") in out
    result = json.loads((tmp_path / "plan.json").read_text())
    assert KEYS <= set(result) and result["fits"]
    assert result["switches"][-1]["total_gb"] <= 24 < result["total_gb"]


def test_cli_tiny_folder(tmp_path, tiny_flux):
    """The real command line, planning a run's own model.pretrained folder."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "diffusion_lab.plan", "experiment=flux_finetune_tiny", f"model.pretrained={tiny_flux}", "trainer=cpu",
         "logger=none", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "plan.json").read_text())
    assert KEYS <= set(result) and result["backbone_params"] > 0 and result["total_gb"] > 0


def test_cli_impossible_budget_is_one_paragraph(tmp_path, capsys):
    from diffusion_lab.memory.report import plan as run
    from diffusion_lab.utils.cli import friendly_errors

    cfg = plan_cfg(tmp_path, "model=latent_sd", "plan/architecture=sd15", "trainer=gpu", "data.resolution=512", "plan.budget_gb=0.3")
    with pytest.raises(SystemExit) as e, friendly_errors():
        run(cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: plan.budget_gb=0.3" in err and "no switch fits" in err and "Traceback" not in err
