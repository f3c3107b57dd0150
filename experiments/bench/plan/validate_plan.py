"""Predicted vs measured peak memory of a training step, on CPU, for width-scaled SD 1.5 / SDXL /
FLUX.1-dev backbones (the shipped architectures with block widths divided, depth and layout kept).

    OMP_NUM_THREADS=1 python experiments/bench/plan/validate_plan.py            # all, writes results.{json,md}
    OMP_NUM_THREADS=1 python experiments/bench/plan/validate_plan.py --only sd   # re-measure a subset (name prefix), keep the rest
    python experiments/bench/plan/validate_plan.py --predict-only               # re-predict the stored measurements
    python experiments/bench/plan/validate_plan.py --fits                        # the 24/48/80 GB table (planned)

Measurement: each configuration runs in a fresh subprocess with glibc's mmap threshold at 64 KiB
(MALLOC_MMAP_THRESHOLD_), so every tensor bigger than that is its own mapping, returned to the OS
when freed: the resident set follows the live tensors instead of the heap's high-water mark. The
process first runs one step of a tiny model (kernels and code pages loaded), frees it, and reads
VmRSS as the baseline; then builds the scaled model, its optimizer and inputs, runs one step
(optimizer state allocated), zero_grads (set_to_none), resets the kernel's peak (VmHWM, by writing
5 to /proc/self/clear_refs) and runs a second step. Measured = VmHWM - baseline: weights, optimizer
state, gradients, activations and temporaries of a steady-state step. The VAE and text encoders
are not run (latents and text states are inputs), so the plan is taken with model.offload_frozen.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
ARCH_DIR = ROOT / "conf" / "plan" / "architecture"


def shipped(name: str) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ARCH_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name=name))


def scaled(name: str) -> dict:
    """The shipped architecture with its widths divided (runs on CPU in seconds)."""
    spec = copy.deepcopy(shipped(name))
    c = spec["backbone"]["config"]
    if name == "sd15":  # 320-640-1280-1280 -> 64-128-256-256, 8 heads of 8..32
        c.update(block_out_channels=[64, 128, 256, 256], cross_attention_dim=128)
    elif name == "sdxl":  # 320-640-1280 -> 64-128-256, heads of 64 -> 32; depth (1, 2, 10 transformer layers) kept
        c.update(block_out_channels=[64, 128, 256], attention_head_dim=[2, 4, 8], cross_attention_dim=256,
                 addition_time_embed_dim=32, projection_class_embeddings_input_dim=6 * 32 + 128)
    elif name == "flux1_dev":  # 24 heads -> 3 (head dim 128 and the RoPE axes kept), 19 + 38 blocks -> 3 + 6
        c.update(num_attention_heads=3, num_layers=3, num_single_layers=6, joint_attention_dim=256, pooled_projection_dim=64)
        spec["text_tokens"] = 128
    spec["name"] = f"{spec['name']} (width-scaled)"
    spec["frozen"] = {}
    return spec


# (id, architecture, resolution, settings); settings are budget.Settings fields
CASES = [
    ("sd_fp32_b1", "sd15", 512, dict(precision="32-true", batch=1)),
    ("sd_fp32_b4", "sd15", 512, dict(precision="32-true", batch=4)),
    ("sd_fp32_b4_ckpt", "sd15", 512, dict(precision="32-true", batch=4, gradient_checkpointing=True)),
    ("sd_bf16mixed_b4", "sd15", 512, dict(precision="bf16-mixed", batch=4)),
    ("sd_bf16true_b4", "sd15", 512, dict(precision="bf16-true", batch=4)),
    ("sd_lora_fp32_b4", "sd15", 512, dict(precision="32-true", batch=4, adapter=True)),
    ("sd_lora_bf16base_b4", "sd15", 512, dict(precision="bf16-mixed", batch=4, adapter=True, base_dtype="bfloat16")),
    ("sdxl_fp32_b1", "sdxl", 512, dict(precision="32-true", batch=1)),
    ("sdxl_fp32_b2_ckpt", "sdxl", 512, dict(precision="32-true", batch=2, gradient_checkpointing=True)),
    ("sdxl_bf16mixed_b2", "sdxl", 512, dict(precision="bf16-mixed", batch=2)),
    ("sdxl_lora_bf16base_b2", "sdxl", 512, dict(precision="bf16-mixed", batch=2, adapter=True, base_dtype="bfloat16")),
    ("sdxl_lora_bf16base_b2_ckpt", "sdxl", 512, dict(precision="bf16-mixed", batch=2, adapter=True, base_dtype="bfloat16", gradient_checkpointing=True)),
    ("flux_fp32_b1", "flux1_dev", 512, dict(precision="32-true", batch=1)),
    ("flux_fp32_b2_ckpt", "flux1_dev", 512, dict(precision="32-true", batch=2, gradient_checkpointing=True)),
    ("flux_bf16mixed_b2", "flux1_dev", 512, dict(precision="bf16-mixed", batch=2)),
    ("flux_bf16true_b2", "flux1_dev", 512, dict(precision="bf16-true", batch=2)),
    ("flux_lora_bf16base_b2", "flux1_dev", 512, dict(precision="bf16-mixed", batch=2, adapter=True, base_dtype="bfloat16")),
    ("flux_lora_fp32base_b2_ckpt", "flux1_dev", 512, dict(precision="bf16-mixed", batch=2, adapter=True, gradient_checkpointing=True)),
    ("flux_qlora_int8_b2", "flux1_dev", 512, dict(precision="bf16-mixed", batch=2, adapter=True, base_dtype="bfloat16", quantization="int8", quant_backend="torchao")),
]
LORA = dict(rank=16, target_modules=["to_k", "to_q", "to_v", "to_out.0"])


def lora():
    from diffusion_lab.components.adapters import lora_config

    return lora_config(**LORA)


def predict(arch_name: str, resolution: int, settings: dict) -> dict:
    from diffusion_lab.memory.architecture import load_architecture
    from diffusion_lab.memory.budget import Settings
    from diffusion_lab.memory.planner import Planner

    planner = Planner(load_architecture(scaled(arch_name)), resolution, lora=lora())
    s = Settings(accelerator="cpu", offload_frozen=True, ema=None, **settings)
    return planner.breakdown(s).as_gb()


# ---- the measured side (runs in the child process) ---------------------------------------------
def _build(spec: dict, settings: dict, shrink: bool = False):
    import torch

    from diffusion_lab.memory.architecture import _get_class, load_architecture

    arch = load_architecture(spec)
    config = {k: v for k, v in arch.backbone_config.items() if not k.startswith("_")}
    if shrink:  # the warm-up model: same classes, a sliver of the width
        for k in ("num_layers", "num_single_layers"):
            if k in config:
                config[k] = 1
    torch.manual_seed(0)
    model = _get_class(arch.backbone_class).from_config(config)
    params_dtype = torch.bfloat16 if settings.get("precision") == "bf16-true" else torch.float32
    if settings.get("adapter"):
        from diffusion_lab.components.adapters import add_lora

        base = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(settings.get("base_dtype", "float32"), torch.float32)
        model.to(base)
        if settings.get("quantization") == "int8":
            _quantize_int8(model)
        add_lora(model, lora())
    else:
        model.to(params_dtype)
    if settings.get("gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    return arch, model


def _quantize_int8(model) -> None:
    """torchao's int8 weight-only quantization of every nn.Linear (quantization=int8_torchao's weights)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())


def _step(arch, model, opt, settings: dict, resolution: int) -> None:
    import torch

    from diffusion_lab.memory.trace import backbone_inputs

    mixed = settings.get("precision", "32-true").endswith("-mixed")
    dtype = torch.bfloat16 if settings.get("precision") == "bf16-true" else torch.float32
    inputs = backbone_inputs(arch, model, settings.get("batch", 1), resolution, dtype, device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
        out = model(**inputs, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(out.float(), torch.randn_like(out, dtype=torch.float32))
    loss.backward()
    del out, loss, inputs
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(arch_name: str, resolution: int, settings: dict) -> dict:
    """In this (fresh) process: peak resident bytes of a steady-state training step."""
    import gc

    import torch

    from diffusion_lab.metrics.profiling import reset_peak, status_kb

    spec = scaled(arch_name)
    arch, warm = _build(spec, settings, shrink=True)
    opt = torch.optim.AdamW([p for p in warm.parameters() if p.requires_grad], foreach=False)
    _step(arch, warm, opt, {**settings, "batch": 1}, 128)
    del warm, opt
    gc.collect()
    baseline = status_kb("VmRSS")["VmRSS"]
    arch, model = _build(spec, settings)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=False)
    _step(arch, model, opt, settings, resolution)
    gc.collect()
    reset_peak()
    _step(arch, model, opt, settings, resolution)
    peak = status_kb("VmHWM")["VmHWM"]
    return {"measured_gb": round((peak - baseline) * 1024 / 1e9, 3), "baseline_gb": round(baseline * 1024 / 1e9, 3)}


def run_case(case_id: str, measured: dict | None = None) -> dict:
    """Measure ``case_id`` in a fresh process (or take ``measured`` from an earlier run) and predict it."""
    _, arch_name, resolution, settings = next(c for c in CASES if c[0] == case_id)
    if measured is None:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, __file__, "--child", case_id], capture_output=True, text=True, env=env, timeout=900)
        if out.returncode:
            raise RuntimeError(f"{case_id} failed:\n{out.stderr[-3000:]}")
        measured = json.loads(out.stdout.strip().splitlines()[-1])
    measured = {k: measured[k] for k in ("measured_gb", "baseline_gb")}
    predicted = predict(arch_name, resolution, settings)
    err = predicted["total_gb"] / measured["measured_gb"] - 1
    return {"case": case_id, "architecture": arch_name, "resolution": resolution, **settings, **measured, "predicted": predicted,
            "predicted_gb": predicted["total_gb"], "error": round(err, 3)}


def write_results(rows: list[dict]) -> None:
    (HERE / "results.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "# Memory plan: predicted vs measured (CPU, width-scaled backbones)",
        "",
        "`OMP_NUM_THREADS=1 python experiments/bench/plan/validate_plan.py` (see its docstring for the method).",
        "Measured: peak RSS of a steady-state training step in a fresh process (mmap-backed tensors),",
        "minus the process's baseline. Predicted: `diffusion_lab.memory` with `accelerator=cpu`, no EMA, frozen parts offloaded.",
        "",
        "| case | precision | adapter | quant | ckpt | batch | weights | grads | optim | activations | predicted GB | measured GB | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["predicted"]
        adapter = "LoRA r16" + (f" ({r.get('base_dtype', 'float32')} base)") if r.get("adapter") else "full"
        lines.append(
            f"| {r['case']} | {r.get('precision')} | {adapter} | {(r['quantization'] + ' (' + r.get('quant_backend', '') + ')') if r.get('quantization') else '-'} | {'yes' if r.get('gradient_checkpointing') else 'no'} | "
            f"{r.get('batch', 1)} | {p['weights_gb']:.3f} | {p['grads_gb']:.3f} | {p['optimizer_gb']:.3f} | {p['activations_gb']:.3f} | "
            f"{r['predicted_gb']:.3f} | {r['measured_gb']:.3f} | {r['error'] * 100:+.1f}% |"
        )
    worst = max(abs(r["error"]) for r in rows)
    lines += ["", f"Largest error: {worst * 100:.1f}% over {len(rows)} configurations (bound: 20%)."]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child")
    p.add_argument("--only", default="")
    p.add_argument("--fits", action="store_true", help="write fits.md: what fits on 24/48/80 GB (planned)")
    p.add_argument("--predict-only", action="store_true", help="re-predict the measurements in results.json (after a change to the model)")
    a = p.parse_args()
    if a.child:
        _, arch_name, resolution, settings = next(c for c in CASES if c[0] == a.child)
        print(json.dumps(measure(arch_name, resolution, settings)))
        return
    if a.fits:
        from fits_table import main as fits

        fits()
        return
    old = {r["case"]: r for r in json.loads((HERE / "results.json").read_text())} if (HERE / "results.json").is_file() else {}
    rows = []
    for case_id, *_ in CASES:
        if not case_id.startswith(a.only):
            if case_id in old:
                rows.append(run_case(case_id, old[case_id]))
            continue
        if a.predict_only and case_id not in old:
            continue
        r = run_case(case_id, old[case_id] if a.predict_only else None)
        print(f"{case_id:32s} predicted {r['predicted_gb']:.3f} GB  measured {r['measured_gb']:.3f} GB  error {r['error'] * 100:+.1f}%", flush=True)
        rows.append(r)
    write_results(rows)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
