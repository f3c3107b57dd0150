"""Plan a training run's peak device memory before running it.

    python -m diffusion_lab.plan model=latent_flux plan/architecture=flux1_dev adapter=lora trainer=gpu data.resolution=1024
    python -m diffusion_lab.plan experiment=sdxl_lora plan/architecture=sdxl plan.budget_gb=24
    python -m diffusion_lab.plan experiment=flux_finetune_tiny model.pretrained=outputs/tiny_flux    # a folder's config.json files

Takes the overrides of ``diffusion_lab.train`` and prints, per rank: weights, gradients, optimizer
state, EMA, activations and frozen parts (VAE + text encoders), from the backbone built on the meta
device (``diffusion_lab/memory``); with ``plan.budget_gb`` the switches that fit it, in the order to
try them. Writes ``<run dir>/plan.json``. A budget nothing fits is a one-paragraph error (exit 2).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import diffusion_lab  # noqa: F401  (registers config resolvers)
from diffusion_lab.memory.architecture import Architecture, load_architecture
from diffusion_lab.memory.budget import GB, Breakdown, Settings
from diffusion_lab.memory.planner import Planner
from diffusion_lab.memory.switches import fit
from diffusion_lab.utils.cli import explain_unknown_keys, friendly_errors
from diffusion_lab.utils.config_path import CONFIG_PATH, conf_dir
from diffusion_lab.utils.errors import ConfigError

# hub ids whose architecture ships in conf/plan/architecture/
HUB_IDS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15", "runwayml/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl", "stabilityai/stable-diffusion-3.5-medium": "sd35_medium",
    "stabilityai/stable-diffusion-3.5-large": "sd35_large", "black-forest-labs/FLUX.1-dev": "flux1_dev", "Qwen/Qwen-Image": "qwen_image",
}


def architecture(cfg: DictConfig) -> Architecture:
    """``plan/architecture=<name>``, else ``model.pretrained`` (a folder's config.json files, or a hub id that ships)."""
    spec = OmegaConf.select(cfg, "plan.architecture")
    if spec is not None:
        return load_architecture(OmegaConf.to_container(spec, resolve=True))
    pretrained = OmegaConf.select(cfg, "model.pretrained", default=None)
    if pretrained and str(pretrained) in HUB_IDS:
        return load_architecture(OmegaConf.load(conf_dir() / "plan" / "architecture" / f"{HUB_IDS[str(pretrained)]}.yaml"))
    if pretrained and Path(str(pretrained)).expanduser().is_dir():
        return load_architecture(folder=pretrained)
    raise ConfigError(
        f"the plan covers the pretrained latent families (model=latent_sd|latent_sdxl|latent_sd3|latent_flux) and reads the "
        f"backbone's architecture from plan/architecture=<name> (shipped: {', '.join(sorted(set(HUB_IDS.values())))}) "
        f"or from model.pretrained's config.json files; model.pretrained={pretrained!r} is neither a folder nor a hub id that ships. "
        f"Set plan/architecture=..., or model.pretrained=DIR with the model's *.json files "
        f"(`hf download <hub id> --include '*.json' --local-dir DIR`)."
    )


def settings(cfg: DictConfig) -> tuple[Settings, list[str]]:
    """The run's memory-relevant settings (and notes on what had to be assumed)."""
    sel = lambda key, default=None: OmegaConf.select(cfg, key, default=default)  # noqa: E731
    notes = []
    devices = sel("trainer.devices", 1)
    if not isinstance(devices, int) or devices < 1:
        devices = int(sel("plan.devices") or 1)
        notes.append(f"trainer.devices={sel('trainer.devices')!r}: planned for {devices} GPU(s) per node (set plan.devices=N).")
    world = devices * int(sel("trainer.num_nodes", 1))
    strategy = str(sel("trainer.strategy._target_", default=sel("trainer.strategy", "")) or "")
    optimizer = str(sel("model.optimizer._target_", "torch.optim.AdamW"))
    ema = sel("callbacks.ema")
    frozen_dtypes = {"vae": sel("vae.dtype", "float32")}
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        frozen_dtypes[part] = sel("text_encoder.dtype", "float32")
    s = Settings(
        precision=str(sel("trainer.precision", "32-true")),
        adapter=sel("adapter.backbone") is not None,
        base_dtype=str(sel("adapter.base_dtype", "float32")),
        quantization=sel("quantization.weights"),
        quant_backend=sel("quantization.backend"),
        quantize_text_encoders=bool(sel("quantization.text_encoders", False)),
        frozen_dtypes=tuple(sorted(frozen_dtypes.items())),
        offload_frozen=bool(sel("model.offload_frozen", False)),
        cpu_offload=bool(sel("trainer.strategy.cpu_offload", False)),
        gradient_checkpointing=bool(sel("model.gradient_checkpointing", False)),
        batch=max(1, math.ceil(int(sel("data.batch_size", 1)) / world)),
        world_size=world,
        sharded="FSDP" in strategy or "ModelParallel" in strategy,
        ema=None if ema is None else str(ema.get("device", "model")),
        optimizer="adamw_8bit" if "8bit" in optimizer else "adamw",
        fused_optimizer=bool(sel("model.optimizer.fused", False)),
        accelerator="cpu" if sel("trainer.accelerator") == "cpu" else "gpu",
        accumulate=int(sel("trainer.accumulate_grad_batches", 1)),
    )
    if s.quantization and not s.adapter:
        notes.append(f"quantization.weights={s.quantization} with adapter=none: a quantized backbone cannot be fully fine-tuned; planned unquantized.")
        s = s.with_(quantization=None)
    if sel("model.group_offload"):
        notes.append(f"model.group_offload={sel('model.group_offload')}: training refuses it (diffusion_lab/modules/latent.py); planned without it.")
    if s.sharded and s.precision == "32-true" and sel("trainer.strategy.param_dtype") in ("bfloat16", "float16"):
        s = s.with_(precision="bf16-mixed")  # FSDP's policy: fp32 shards, blocks gathered and computed in bf16
    return s, notes


def lora(cfg: DictConfig):
    from diffusion_lab.components.adapters import lora_config

    a = cfg.adapter if OmegaConf.select(cfg, "adapter.backbone") is not None else cfg.plan.lora_default
    return lora_config(rank=int(a.rank), target_modules=list(a.target_modules), variant=str(OmegaConf.select(a, "variant", default="lora")))


def table(b: Breakdown) -> str:
    gb = b.as_gb()
    rows = [("weights", "weights_gb"), ("gradients", "grads_gb"), ("optimizer state", "optimizer_gb"), ("EMA", "ema_gb"),
            ("activations", "activations_gb"), ("frozen (VAE, text encoders)", "frozen_gb"), ("optimizer step temporaries", "step_temporaries_gb"),
            ("FSDP gathered blocks", "gather_gb")]
    lines = [f"  {name:30s} {gb[key]:9.2f} GB" for name, key in rows if gb[key] or key in ("weights_gb", "activations_gb")]
    lines.append(f"  {'peak per rank':30s} {gb['total_gb']:9.2f} GB")
    return "\n".join(lines)


def plan(cfg: DictConfig) -> dict:
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
    fit_error = None
    if budget is not None:
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
            fit_error = (
                f"plan.budget_gb={budget}: no switch fits {arch.name} at {resolution} px in {budget} GB per rank. With every switch the plan knows "
                f"({' '.join(o for o, _, _ in steps) or 'none applies'}) the peak is still {best / GB:.1f} GB. Use a device with more memory, "
                f"more devices with trainer=fsdp (weights, gradients and optimizer state are divided by their number), or a lower data.resolution."
            )
    out = Path(cfg.paths.output_dir) / "plan.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nplan: {out}")
    if fit_error:
        raise ConfigError(fit_error)
    return result


@hydra.main(config_path=CONFIG_PATH, config_name="plan", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with friendly_errors():
        plan(cfg)


if __name__ == "__main__":
    with explain_unknown_keys("plan"):
        main()
