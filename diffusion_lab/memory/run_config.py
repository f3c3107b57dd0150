"""A run's config (the overrides of ``diffusion_lab.train``) as the memory plan reads it: the
architecture to plan, the memory-relevant settings, and the LoRA an adapter run injects."""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from diffusion_lab.memory.architecture import Architecture, load_architecture
from diffusion_lab.memory.budget import Settings
from diffusion_lab.utils.config_path import conf_dir
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
        notes.append(f"model.group_offload={sel('model.group_offload')}: training refuses it (diffusion_lab/modules/latent_setup.py); planned without it.")
    if s.sharded and s.precision == "32-true" and sel("trainer.strategy.param_dtype") in ("bfloat16", "float16"):
        s = s.with_(precision="bf16-mixed")  # FSDP's policy: fp32 shards, blocks gathered and computed in bf16
    return s, notes


def lora(cfg: DictConfig):
    from diffusion_lab.components.adapters import lora_config

    a = cfg.adapter if OmegaConf.select(cfg, "adapter.backbone") is not None else cfg.plan.lora_default
    return lora_config(rank=int(a.rank), target_modules=list(a.target_modules), variant=str(OmegaConf.select(a, "variant", default="lora")))
