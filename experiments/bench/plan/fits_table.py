"""What fits on one 24 / 48 / 80 GB GPU, from the memory plan (planned, not measured).

    python experiments/bench/plan/fits_table.py      # writes fits.md and fits.json beside it

Per model at its native resolution, batch 1, bf16-mixed, AdamW, EMA on the device, frozen parts in
bf16 on the device, and: full fine-tune; LoRA (rank 16 on the attention projections, bf16 base);
QLoRA (the same on an nf4 base, text encoders nf4 too). A cell is the peak with no switch, or the
fewest switches (``diffusion_lab.memory.switches.fit``) that bring it under the budget, or "no".
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from diffusion_lab.components.adapters import lora_config
from diffusion_lab.memory.architecture import load_architecture
from diffusion_lab.memory.budget import GB, Settings
from diffusion_lab.memory.planner import Planner
from diffusion_lab.memory.switches import fit

HERE = Path(__file__).resolve().parent
ARCH = HERE.parents[2] / "conf" / "plan" / "architecture"
MODELS = [("sd15", 512), ("sdxl", 1024), ("sd35_medium", 1024), ("sd35_large", 1024), ("flux1_dev", 1024), ("qwen_image", 1024)]
BUDGETS = [24, 48, 80]
SHORT = {
    "callbacks.ema.device=cpu": "EMA on CPU", "model.optimizer.fused=true": "fused AdamW", "model.offload_frozen=true": "offload frozen",
    "model.gradient_checkpointing=true": "ckpt", "optimizer@model.optimizer=adamw_8bit": "8-bit AdamW", "trainer.precision=bf16-mixed": "bf16",
}
FROZEN_BF16 = (("text_encoder", "bfloat16"), ("text_encoder_2", "bfloat16"), ("text_encoder_3", "bfloat16"), ("vae", "bfloat16"))
MODES = {
    "full": (Settings(precision="bf16-mixed", frozen_dtypes=FROZEN_BF16), ("adapter=", "quantization=", "adapter.")),
    "LoRA": (Settings(precision="bf16-mixed", adapter=True, base_dtype="bfloat16", frozen_dtypes=FROZEN_BF16), ("quantization=",)),
    "QLoRA nf4": (Settings(precision="bf16-mixed", adapter=True, base_dtype="bfloat16", quantization="nf4", quantize_text_encoders=True, frozen_dtypes=FROZEN_BF16), ()),
}


def cell(planner: Planner, s: Settings, exclude: tuple, budget: float) -> str:
    steps, ok = fit(planner, s, budget * GB, exclude)
    if not ok:
        return "no"
    if not steps:
        return f"yes ({planner.breakdown(s).total / GB:.0f} GB)"
    return f"{steps[-1][2] / GB:.0f} GB with " + ", ".join(SHORT.get(o, o) for o, _, _ in steps)


def main() -> None:
    rows, data = [], []
    for name, resolution in MODELS:
        arch = load_architecture(OmegaConf.to_container(OmegaConf.load(ARCH / f"{name}.yaml")))
        planner = Planner(arch, resolution, lora=lora_config(rank=16, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        for mode, (s, exclude) in MODES.items():
            cells = [cell(planner, s, exclude, b) for b in BUDGETS]
            bare = planner.breakdown(s).as_gb()
            data.append({"model": arch.name, "resolution": resolution, "mode": mode, "peak_gb_no_switch": bare["total_gb"], **dict(zip(map(str, BUDGETS), cells))})
            rows.append(f"| {arch.name} | {resolution} | {mode} | {bare['total_gb']:.0f} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    lines = [
        "# What fits on one GPU (planned, not measured)",
        "",
        "`python experiments/bench/plan/fits_table.py` (see its docstring). Batch 1, bf16-mixed, AdamW, EMA on the device, frozen",
        "parts in bf16 on the device; LoRA rank 16 on to_q/to_k/to_v/to_out.0. \"peak\" is with no switch; a cell names the fewest",
        "switches that fit that budget (ckpt = model.gradient_checkpointing=true, offload frozen = model.offload_frozen=true).",
        "",
        "| model | px | training | peak GB | 24 GB | 48 GB | 80 GB |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    (HERE / "fits.md").write_text("\n".join(lines) + "\n")
    (HERE / "fits.json").write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
