"""Checks run by ``train.py`` after everything is built and before ``fit``: a wrong input costs
seconds, not a night. Each raises a ``ConfigError`` that names the key or file and the fix."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import OmegaConf

from diffusion_lab.utils.errors import ConfigError, DataError


def check_captions_for_text_model(module: pl.LightningModule, datamodule: pl.LightningDataModule) -> None:
    """A text-conditioned model (``LatentDiffusion``: SD, SDXL) trains on image-caption pairs: one
    real training item must carry a ``caption``, before ``fit`` rather than at step 1."""
    from diffusion_lab.modules import LatentDiffusion

    if not isinstance(module, LatentDiffusion) or "caption" in datamodule.dataset[0]:
        return
    why = getattr(datamodule.dataset, "caption_note", None)
    raise DataError(
        f"{type(module).__name__} trains on image-caption pairs but the data has no captions"
        f"{f' ({why})' if why else ''}. Set data.caption_column to the caption column (data=image_folder: a "
        f"column of metadata.jsonl/metadata.csv beside 'file_name', or auto for text/caption/.txt files beside the "
        f"images; data=hf: the data set's caption column), or use data=digits_captioned."
    )


def check_pixel_model_fits_data(module: pl.LightningModule, datamodule: pl.LightningDataModule) -> None:
    """A pixel-space UNet must take and return images shaped like the data: compares
    ``backbone`` (in/out channels, sample_size, how often its down blocks halve the size) with
    one real training item ``[C, H, W]``."""
    from diffusion_lab.components.vae import IdentityCodec

    if hasattr(datamodule, "check_model"):  # data written for one model (encoded shards) says if it fits
        datamodule.check_model(module)
    check_captions_for_text_model(module, datamodule)
    if not isinstance(getattr(module, "codec", None), IdentityCodec):
        return  # latent models check their parts when they are built (components/checks.py)
    channels, height, width = datamodule.dataset[0]["pixel_values"].shape
    cfg = module.base_backbone.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
    problems = []
    for key in ("in_channels", "out_channels"):
        if cfg[key] != channels:
            problems.append(
                f"backbone.{key}={cfg[key]} but the data gives {channels}-channel images ({channels}x{height}x{width}, "
                f"data.channels); set backbone.{key}=${{data.channels}} (the default) or change the data's channels."
            )
    from diffusion_lab.data.datamodule import bucket_ids_of

    bucketed = bucket_ids_of(datamodule.dataset) is not None  # several sizes: sample_size is the grids' only
    if size not in (height, (height, width)) and not bucketed:
        problems.append(
            f"backbone.sample_size={size} but the data gives {height}x{width} images (data.resolution); "
            f"samples and the exported pipeline would have the wrong size. Set backbone.sample_size=${{data.resolution}} "
            f"(the default) or data.resolution={size if isinstance(size, int) else size[0]}."
        )
    # every down block but the last halves the image (diffusers UNet2DModel), and the up path must
    # double back to the same sizes to meet the skip connections (a DiT has patches instead: checked when built)
    blocks = len(cfg.get("down_block_types", [None]))
    factor = 2 ** (blocks - 1)
    if height % factor or width % factor:
        ok = max(factor, round(height / factor) * factor)
        problems.append(
            f"The UNet does not fit the data: its {blocks} down blocks (backbone.down_block_types) halve the image "
            f"{blocks - 1} times, so data.resolution must be a multiple of {factor}, and the data gives {height}x{width} "
            f"images. Set data.resolution={ok} (or another multiple of {factor}), or pick a UNet with fewer down blocks "
            f"for {height} px (backbone=tiny or backbone=ddpm_digits: 2 blocks, any multiple of 2)."
        )
    if problems:
        raise ConfigError(" ".join(problems))


def check_callbacks_fit_model(module: pl.LightningModule, callbacks_cfg) -> None:
    """Callbacks that need a diffusion model (UNet EMA, sample grids, noising strip, FID) on a
    model without one (``model=autoencoder``): name the ``callbacks.<key>`` entries and the fix."""
    from hydra.utils import get_class

    from diffusion_lab.callbacks import EMACallback, NoisingStripCallback, SampleGridCallback
    from diffusion_lab.callbacks.metrics import FIDCallback
    from diffusion_lab.modules.diffusion_module import DiffusionModule

    if isinstance(module, DiffusionModule) or not callbacks_cfg:
        return
    needs_diffusion = (EMACallback, SampleGridCallback, NoisingStripCallback, FIDCallback)
    keys = [
        key
        for key, node in callbacks_cfg.items()
        if node is not None and "_target_" in node and issubclass(get_class(node._target_), needs_diffusion)
    ]
    if keys:
        listed = ", ".join(f"callbacks.{k}" for k in keys)
        raise ConfigError(
            f"{listed} need a diffusion model (a UNet to average, samples to draw), which the model "
            f"({type(module).__name__}) is not. For model=autoencoder use callbacks=autoencoder (experiment=vae_digits sets it), "
            f"or switch them off: " + " ".join(f"callbacks.{k}=null" for k in keys) + "."
        )


def check_checkpoint_file(ckpt_path: str, strategy=None) -> None:
    """``ckpt_path`` must be a whole checkpoint file (a ``torch.save`` zip archive), or the folder of
    a sharded one (``trainer=fsdp``: one shard per rank, a ``.metadata`` index and ``meta.pt``),
    which only the FSDP2 ``strategy`` resumes."""
    path = Path(ckpt_path).expanduser()
    others = sorted(str(p) for p in path.parent.glob("*.ckpt") if p != path) if path.parent.is_dir() else []
    hint = f" Checkpoints next to it: {others}." if others else " Checkpoints are written to <run dir>/checkpoints/ (last.ckpt)."
    if path.is_dir():
        if not ((path / ".metadata").is_file() and (path / "meta.pt").is_file()):
            raise ConfigError(f"ckpt_path={ckpt_path!r} is a folder but not a whole sharded checkpoint (no .metadata / meta.pt): "
                              f"it was cut short or is another folder. Resume from an older checkpoint instead.{hint}")
        from diffusion_lab.components.fsdp import FSDP2Strategy

        if strategy is not None and not isinstance(strategy, FSDP2Strategy):
            raise ConfigError(
                f"ckpt_path={ckpt_path} is a sharded FSDP checkpoint (a folder, one shard per rank), which only trainer=fsdp / "
                f"fsdp_cpu can resume, on any number of devices (trainer=fsdp_cpu trainer.devices=1 runs on one CPU process). Add "
                f"trainer=fsdp (or fsdp_cpu) to this command, or resume from a checkpoint of a run without FSDP."
            )
        return
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r} does not exist.{hint}")
    if not zipfile.is_zipfile(path):
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} is not a whole checkpoint ({path.stat().st_size} bytes, not a torch zip "
            f"archive): it was cut short (copied or written by a tool without atomic saves) or is another "
            f"kind of file. Resume from an older checkpoint instead.{hint}"
        )


def check_quantization_applies(cfg) -> None:
    """``quantization=`` quantizes a pretrained frozen base while it is loaded; a family without one
    (pixel models, the autoencoder, ControlNet) would silently train unquantized: a ConfigError."""
    name = OmegaConf.select(cfg, "quantization.name", default="none")
    if name in (None, "none") or "quantization" in cfg.model:
        return
    from hydra.core.hydra_config import HydraConfig

    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    family = choices.get("model") or cfg.model.get("_target_", "this model")
    raise ConfigError(
        f"quantization={name} quantizes the frozen pretrained backbone of a QLoRA run (model=latent_sd|latent_sdxl|latent_sd3|"
        f"latent_flux), but model={family} has no such base: nothing would be quantized. Use quantization=none, or one of those families."
    )
