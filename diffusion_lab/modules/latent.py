"""Latent diffusion (Stable Diffusion): the shared diffusion step on VAE latents, conditioned on
text-encoder states of the captions. Differs from ``PixelDiffusion`` only in encode/decode,
conditioning and export."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from diffusion_lab.components.adapters import KOHYA_FILE, add_lora, fused_copy, has_lora, kohya_state_dict, lora_metadata, lora_state_dict
from diffusion_lab.components.checks import check_latent_parts
from diffusion_lab.components.pretrained import Dtype, from_pretrained, torch_dtype
from diffusion_lab.components.text import TextConditioner
from diffusion_lab.components.vae import VAECodec
from diffusion_lab.data.caching import CachedLatentDataset, cache_latents
from diffusion_lab.modules.diffusion_module import DiffusionModule, batch_len
from diffusion_lab.utils.errors import ConfigError, DataError
from diffusion_lab.utils.io import atomic_dir


class LatentDiffusion(DiffusionModule):
    """``UNet2DConditionModel`` on scaled VAE latents, cross-attending to caption states.

    Args:
        codec: frozen VAE (``vae=...``); conditioner: tokenizer + text encoder (``text_encoder=...``).
        resolution, image_channels: of the training images (``data.*``), checked against the parts.
        unet_lora / text_lora: ``LoraConfig`` to train a LoRA instead of the full UNet / text encoder.
        unet_base_dtype: dtype the frozen base UNet is held in under LoRA (its LoRA stays fp32).
        caption_dropout: P(caption -> "") per example, for classifier-free guidance.
        cache: precompute VAE posteriors (and text states of a frozen encoder) before training.
        export_fused: LoRA runs also write ``<export dir>/fused``, a pipeline with the LoRA merged.
        safety_checker: folder/hub id with ``safety_checker/`` + ``feature_extractor/`` for exports (None = off).
        pretrained, local_files_only: where the parts came from (recorded; Hydra loads the parts).
        **kwargs: the shared ``DiffusionModule`` arguments (``unet``, ``process``, ``sampler``, ``optimizer``, ...).
    """

    hparams_ignore = DiffusionModule.hparams_ignore + ("codec", "conditioner", "unet_lora", "text_lora")
    family = "latent_sd"
    processes = ("vp", "edm")
    process_limits = (
        "StableDiffusionPipeline cannot run a flow-matching sampler (diffusers' flow schedulers have no "
        "scale_model_input / init_noise_sigma); use process=vp (or edm) for SD 1.x/SDXL UNets."
    )
    # what ``text_states`` returns, and so what the cache holds per caption
    text_keys: tuple[str, ...] = ("encoder_hidden_states",)
    # per-image batch entries besides images and captions that the cache must carry along
    cached_batch_keys: tuple[str, ...] = ()

    def __init__(
        self,
        unet: torch.nn.Module,
        process,
        sampler,
        optimizer,
        codec: VAECodec,
        conditioner: TextConditioner,
        resolution: int,
        image_channels: int = 3,
        unet_lora=None,
        text_lora=None,
        unet_base_dtype: Dtype = "float32",
        caption_dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        cache: bool = False,
        export_fused: bool = False,
        safety_checker: str | None = None,
        pretrained: str | None = None,
        local_files_only: bool = False,
        **kwargs,
    ) -> None:
        self.check_process(process, sampler)  # before the parts: a wrong process is the first thing to fix
        check_latent_parts(unet, codec, conditioner, resolution, image_channels)
        if not 0.0 <= caption_dropout < 1.0:
            raise ConfigError(f"model.caption_dropout={caption_dropout} must be in [0, 1).")
        if unet_lora is not None:
            add_lora(unet.to(torch_dtype(unet_base_dtype)), unet_lora)
        elif unet_base_dtype != "float32":
            raise ConfigError(
                f"adapter.base_dtype={unet_base_dtype} holds the frozen UNet of a LoRA in half precision, but "
                f"adapter=none trains the whole UNet, whose weights must stay float32; use trainer.precision=bf16-mixed instead."
            )
        if text_lora is not None:
            for encoder in conditioner.encoders:
                add_lora(encoder, text_lora)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if not conditioner.frozen:
                for encoder in conditioner.encoders:
                    encoder.gradient_checkpointing_enable()
        super().__init__(unet, process, sampler, optimizer, **kwargs)
        self.codec = codec
        self.conditioner = conditioner
        self.train()  # from_pretrained returns eval-mode models; Lightning keeps the mode it finds

    # ---- what differs from pixel diffusion --------------------------------------------------
    def encode(self, batch: dict) -> torch.Tensor:
        """Latents ``[N, c, H/f, W/f]``: a fresh posterior sample while training, its mean in eval
        (deterministic val/loss). Cached batches carry the posterior, so the draw is the same."""
        moments = batch["latent_moments"] if "latent_moments" in batch else self.codec.moments(batch["pixel_values"])
        return self.codec.latents(moments.to(self.device), sample=self.codec.sample_posterior and self.training)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(x0)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """Inputs cast to the UNet's dtype (a LoRA base held in bf16/fp16 must also sample
        without autocast, e.g. on CPU); output in fp32."""
        dtype = self.base_unet.dtype
        cond = {k: v.to(dtype) for k, v in cond.items()}
        return self.unet(x_t.to(dtype), t, **cond).sample.float()

    def text_states(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Captions -> the UNet's text conditioning (``text_keys``): ``encoder_hidden_states`` ``[N, L, D]``."""
        return {"encoder_hidden_states": self.conditioner(captions)}

    def conditioning(self, batch: dict, train: bool) -> dict[str, torch.Tensor]:
        """``text_states`` of the captions (or the cached ones); while training each caption is
        replaced by "" with probability ``caption_dropout`` (the same draw with or without the cache)."""
        p = self.hparams.caption_dropout
        drop = torch.rand(batch_len(batch)) < p if train and p > 0 else None
        if "encoder_hidden_states" in batch:
            states = {k: batch[k] for k in self.text_keys}
            if drop is not None:
                empty = self._empty_states()
                states = {k: torch.where(drop.to(v.device).view(-1, *[1] * (v.ndim - 1)), empty[k].to(v), v) for k, v in states.items()}
        else:
            captions = self._captions(batch)
            if drop is not None:
                captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            states = self.text_states(captions)
        return states

    def sampling_conditioning(self, cond_batch: dict | None, n: int):
        """Prompts from ``cond_batch["caption"]`` (else empty); the unconditional half is ""."""
        captions = list(cond_batch["caption"]) if cond_batch and "caption" in cond_batch else [""] * n
        return self.text_states(captions), self.text_states([""] * n)

    def latent_shape(self, n: int) -> tuple[int, ...]:
        size = self.hparams.resolution // self.codec.downsample_factor
        return (n, self.codec.latent_channels, size, size)

    def _captions(self, batch: dict) -> list[str]:
        if "caption" not in batch:
            raise DataError(
                "LatentDiffusion trains on image-caption pairs but the batches have no 'caption'. Set "
                "data.caption_column (data=image_folder: a metadata.jsonl/csv column or .txt files beside the "
                "images; data=hf: the caption column), or use data=digits_captioned."
            )
        return list(batch["caption"])

    @torch.no_grad()
    def _empty_states(self) -> dict[str, torch.Tensor]:
        return self.text_states([""])

    # ---- caching ----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if not self.hparams.cache:
            return
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "train_set"):
            raise ConfigError("model.cache=true needs the data module of data.datamodule (diffusion_lab.data.DiffusionDataModule).")
        _warn_if_random_transform(dm.train_set)
        text_fn = self.text_states if self.conditioner.frozen else None  # a trained encoder changes: not cacheable
        for name in ("train_set", "val_set"):
            ds = getattr(dm, name)
            if ds is not None and not isinstance(ds, CachedLatentDataset):
                cached = cache_latents(ds, self.codec.moments, text_fn, self.device, dm.per_device_batch_size, keep=self.cached_batch_keys)
                setattr(dm, name, cached)

    # ---- export -----------------------------------------------------------------------------
    def pipeline(self, fused: bool = False) -> StableDiffusionPipeline:
        """A ``StableDiffusionPipeline`` of the current weights (float32 copies of any part held in
        half precision). ``fused``: LoRA merged into copies of the base weights."""
        unet, (text_encoder,) = self._pipeline_parts(fused)
        safety_checker, feature_extractor = self._safety_checker()
        return StableDiffusionPipeline(
            vae=_float32(self.codec.vae),
            text_encoder=text_encoder,
            tokenizer=self.conditioner.tokenizer,
            unet=unet,
            scheduler=self.sampling_scheduler(),
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            requires_safety_checker=safety_checker is not None,
        )

    def _pipeline_parts(self, fused: bool) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
        """(UNet, float32 text encoders) for a pipeline; ``fused``: LoRA merged into float32 copies."""
        unet, encoders = self.base_unet, list(self.conditioner.encoders)
        if fused:
            unet = fused_copy(unet) if has_lora(unet) else _float32(unet)
            encoders = [fused_copy(e) if has_lora(e) else e for e in encoders]
        return unet, [_float32(e) for e in encoders]

    def _safety_checker(self):
        source = self.hparams.safety_checker
        if not source:
            return None, None
        kw = dict(pretrained=source, local_files_only=self.hparams.local_files_only, key="model.safety_checker")
        checker = from_pretrained("diffusers.pipelines.stable_diffusion.safety_checker.StableDiffusionSafetyChecker", subfolder="safety_checker", **kw)
        return checker, from_pretrained("transformers.CLIPImageProcessor", subfolder="feature_extractor", **kw)

    def export(self, out_dir: str) -> None:
        """Full fine-tune: a ``StableDiffusionPipeline`` folder. LoRA: ``pytorch_lora_weights.safetensors``
        (``pipe.load_lora_weights(out_dir)``) + ``lora_kohya.safetensors`` (A1111/ComfyUI) [+ ``fused/``]."""
        if not has_lora(self.base_unet):
            with atomic_dir(out_dir) as tmp:
                self.pipeline(fused=True).save_pretrained(tmp, safe_serialization=True)
            return
        with atomic_dir(out_dir) as tmp:
            self.save_lora(tmp)
            if self.hparams.export_fused:
                self.pipeline(fused=True).save_pretrained(Path(tmp) / "fused", safe_serialization=True)

    def save_lora(self, out_dir: str) -> None:
        """The LoRA weights into ``out_dir``: diffusers layout + kohya layout."""
        parts = {"unet": self.base_unet}
        if has_lora(self.conditioner.text_encoder):
            parts["text_encoder"] = self.conditioner.text_encoder
        StableDiffusionPipeline.save_lora_weights(
            out_dir,
            unet_lora_layers=lora_state_dict(self.base_unet),
            text_encoder_lora_layers=lora_state_dict(parts["text_encoder"]) if "text_encoder" in parts else None,
            unet_lora_adapter_metadata=lora_metadata(self.base_unet),
            text_encoder_lora_adapter_metadata=lora_metadata(parts["text_encoder"]) if "text_encoder" in parts else None,
            safe_serialization=True,
        )
        config = self.base_unet.peft_config["default"]
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(config.r), "ss_network_alpha": str(config.lora_alpha)}
        save_file(kohya_state_dict(parts), str(Path(out_dir) / KOHYA_FILE), metadata=meta)


def _float32(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` itself if it is float32, else a float32 copy (exports load in plain diffusers)."""
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module
    return copy.deepcopy(module).float()


def _warn_if_random_transform(dataset) -> None:
    base = getattr(dataset, "dataset", dataset)  # a Subset of the split
    transform = getattr(base, "transform", None)
    if getattr(transform, "crop", "center") == "random" or getattr(transform, "random_flip", False):
        warnings.warn(
            "model.cache=true with random crops/flips: the cache holds one crop/flip per image, so training sees "
            "less augmentation than without it (set data.crop=center data.random_flip=false, or model.cache=false).",
            stacklevel=2,
        )
