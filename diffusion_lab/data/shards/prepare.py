"""What ``python -m diffusion_lab.prepare`` does: build a source data config's datamodule (its transform and
train/val split) and, with ``prepare.encode=true``, the model, then ``write_shards``; and the train command
that reads the result."""

from __future__ import annotations

import re

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.data.shards.writing import check_out_dir, write_shards
from diffusion_lab.utils.errors import ConfigError


def prepare(cfg: DictConfig) -> dict:
    """Write ``cfg.data`` to ``cfg.out_dir``; returns the manifest."""
    pl.seed_everything(cfg.seed, workers=True)
    target = OmegaConf.select(cfg, "data.datamodule._target_", default="")
    if not target.endswith("DiffusionDataModule"):
        raise ConfigError(f"prepare reads a source data config (data=image_folder, hf, digits, digits_captioned, ...); data= builds {target}. Shards are written from sources, not from shards.")
    p = cfg.prepare
    device = encode_device(p.device) if p.encode else "cpu"  # a device this machine lacks: before any work
    check_out_dir(cfg.out_dir, cfg.prepare.overwrite)  # taken, or an object store out of reach: before any work
    source = instantiate(cfg.data.datamodule)
    source.setup()
    module, model_config = None, None
    if p.encode:
        module = instantiate(cfg.model)
        model_config = {"vae_config": OmegaConf.to_container(cfg.vae, resolve=True), "pretrained": OmegaConf.select(cfg, "model.pretrained"),
                        "train_overrides": model_overrides()}
        if "text_encoder" in cfg:
            model_config["text_encoder_config"] = OmegaConf.to_container(cfg.text_encoder, resolve=True)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data["_skipped"] = [str(f) for f in getattr(source.dataset, "skipped", [])]  # the source's own on_bad_image=skip
    return write_shards(
        {"train": source.train_set, "val": source.val_set},
        cfg.out_dir,
        source=data,
        resolution=cfg.data.resolution,
        channels=cfg.data.channels,
        module=module,
        model_config=model_config,
        text_states=p.text_states,
        num_workers=p.num_workers,
        batch_size=p.batch_size,
        chunk_bytes=str(p.chunk_bytes),
        chunk_size=p.chunk_size,
        on_bad_image=p.on_bad_image,
        device=device,
        overwrite=p.overwrite,
        store_dtype=p.store_dtype,
        staging_dir=p.staging_dir,
        bucket_sizes=getattr(getattr(source.dataset, "buckets", None), "sizes", None),  # data.buckets=true
    )


def encode_device(device: str) -> str:
    """``prepare.device`` as a torch device string (``auto``: CUDA when present); ``ConfigError``
    for one this machine lacks (else every litdata worker fails on its first item)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"prepare.device={device!r} is not a device: use auto (CUDA when present), cpu or cuda (cuda:N).") from None
    if kind.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is built without CUDA" if torch.version.cuda is None else "torch sees no CUDA device here"
            raise ConfigError(f"prepare.device={device} but {why} (torch {torch.__version__}): use prepare.device=cpu, or auto (CUDA when present).")
        if kind.index is not None and kind.index >= count:
            raise ConfigError(f"prepare.device={device} but torch sees {count} CUDA device(s) (cuda:0..cuda:{count - 1}): pick one of those, or prepare.device=auto.")
    elif kind.type != "cpu":
        raise ConfigError(f"prepare.device={device}: the encoders run on auto, cpu or cuda (cuda:N).")
    return device


# the config groups (and their keys) that build the model: what a train command on encoded shards repeats
MODEL_GROUPS = ("model", "backbone", "vae", "text_encoder", "process", "quantization", "controlnet", "adapter")


def model_overrides() -> list[str]:
    """The command-line overrides of this prepare that build its model (``model=latent_sd
    model.pretrained=... vae=...``), ``model=`` first even when it was the default: training on
    encoded shards needs the same model."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    hc = HydraConfig.get()
    given = [o for o in hc.overrides.task if re.split(r"[./=@]", o.lstrip("+~"), maxsplit=1)[0] in MODEL_GROUPS]
    model = [] if any(o.lstrip("+~").startswith("model=") for o in given) else [f"model={hc.runtime.choices.get('model')}"]
    return model + given


def train_command(out_dir: str, manifest: dict) -> str:
    """The command that trains on the shards just written (encoded ones: with the model they hold)."""
    command = f"python -m diffusion_lab.train data=shards data.root={out_dir} data.resolution={manifest['resolution']} data.channels={manifest['channels']}"
    if manifest["kind"] == "latents":
        command += "".join(f" {o}" for o in (manifest.get("model") or {}).get("train_overrides") or [])
    return command
