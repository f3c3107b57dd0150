"""The memory plan of a run's config, printed and written to ``<run dir>/plan.json``
(``python -m diffusion_lab.plan``): the breakdown per rank and, with ``plan.budget_gb``, the
switches that fit it, in the order to try them. A budget nothing fits is a ConfigError."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from diffusion_lab.memory.architecture import Architecture
from diffusion_lab.memory.budget import GB, Breakdown, Settings
from diffusion_lab.memory.planner import Planner
from diffusion_lab.memory.run_config import architecture, lora, settings
from diffusion_lab.memory.switches import fit
from diffusion_lab.utils.errors import ConfigError


def table(b: Breakdown) -> str:
    gb = b.as_gb()
    rows = [("weights", "weights_gb"), ("gradients", "grads_gb"), ("optimizer state", "optimizer_gb"), ("EMA", "ema_gb"),
            ("activations", "activations_gb"), ("frozen (VAE, text encoders)", "frozen_gb"), ("optimizer step temporaries", "step_temporaries_gb"),
            ("FSDP gathered blocks", "gather_gb")]
    lines = [f"  {name:30s} {gb[key]:9.2f} GB" for name, key in rows if gb[key] or key in ("weights_gb", "activations_gb")]
    lines.append(f"  {'peak per rank':30s} {gb['total_gb']:9.2f} GB")
    return "\n".join(lines)


def plan(cfg: DictConfig) -> dict:
    """Plan ``cfg``'s run: print the breakdown (and the switches for ``plan.budget_gb``), write
    ``plan.json``; returns what it wrote. ConfigError when no switch fits the budget."""
    arch = architecture(cfg)
    resolution = int(OmegaConf.select(cfg, "plan.resolution") or cfg.data.resolution)
    s, notes = settings(cfg)
    planner = Planner(arch, resolution, lora=lora(cfg))
    counts = planner.counts(s.adapter)
    b = planner.breakdown(s)
    what = f"{'LoRA r' + str(lora(cfg).r) if s.adapter else 'full fine-tune'}, {s.precision}" + (f", {s.quantization} base" if s.quantization else "")
    print(f"\nmemory plan: {arch.name} ({arch.backbone_class.rsplit('.', 1)[-1]}, {(counts.params + counts.buffers) / 1e9:.3f}B parameters), "
          f"{resolution} px, {what}, batch {s.batch}/rank x {s.world_size} rank(s){' FSDP' if s.sharded else ''}"
          f"{', gradient checkpointing' if s.gradient_checkpointing else ''}")
    print(table(b))
    for note in notes:
        print(f"  note: {note}")
    result = {**b.as_gb(), "architecture": arch.name, "resolution": resolution, "settings": {k: v for k, v in vars(s).items()},
              "backbone_params": counts.params + counts.buffers, "trainable_params": counts.trainable_adapter if s.adapter else counts.params,
              "frozen_params": counts.frozen, "notes": notes}
    budget = OmegaConf.select(cfg, "plan.budget_gb")
    fit_error = None if budget is None else fit_budget(planner, s, b, budget, arch, resolution, result)
    out = Path(cfg.paths.output_dir) / "plan.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nplan: {out}")
    if fit_error:
        raise ConfigError(fit_error)
    return result


def fit_budget(planner: Planner, s: Settings, b: Breakdown, budget: float | int, arch: Architecture, resolution: int, result: dict) -> str | None:
    """The switches that bring the peak under ``budget`` GB, printed and added to ``result``;
    returns the error paragraph when none does (None: it fits)."""
    steps, ok = fit(planner, s, float(budget) * GB)
    result["budget_gb"], result["fits"] = float(budget), ok
    result["switches"] = [{"override": o, "why": why, "total_gb": round(t / GB, 3)} for o, why, t in steps]
    if b.total <= float(budget) * GB:
        print(f"\nfits in {budget} GB as it is.")
    elif ok:
        print(f"\nto fit {budget} GB, try in this order (peak per rank after each):")
        for o, why, t in steps:
            print(f"  {o:52s} {t / GB:8.2f} GB   {why}")
        print(f"paste: {' '.join(o for o, _, _ in steps)}")
    else:
        best = steps[-1][2] if steps else b.total
        return (
            f"plan.budget_gb={budget}: no switch fits {arch.name} at {resolution} px in {budget} GB per rank. With every switch the plan knows "
            f"({' '.join(o for o, _, _ in steps) or 'none applies'}) the peak is still {best / GB:.1f} GB. Use a device with more memory, "
            f"more devices with trainer=fsdp (weights, gradients and optimizer state are divided by their number), or a lower data.resolution."
        )
    return None
