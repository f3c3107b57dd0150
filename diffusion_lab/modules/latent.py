"""Latent diffusion (Stable Diffusion): the shared diffusion step on VAE latents, conditioned on
text-encoder states of the captions. Differs from a pixel ``DiffusionModule`` in its codec (a VAE
instead of the identity) and its text conditioning: caption dropout, cached text states, LoRA on
the text encoders. Its export is ``diffusion_lab/export`` (``StableDiffusionPipeline``)."""

from __future__ import annotations

import torch

from diffusion_lab.components.adapters import add_lora
from diffusion_lab.components.checks import check_latent_parts
from diffusion_lab.components.pretrained import Dtype, torch_dtype
from diffusion_lab.components.quantization import check_quantized_training, is_quantized
from diffusion_lab.components.text import TextConditioner
from diffusion_lab.components.vae import VAECodec
from diffusion_lab.modules.diffusion_module import DiffusionModule, batch_len
from diffusion_lab.utils.errors import ConfigError, DataError


class LatentDiffusion(DiffusionModule):
    """``UNet2DConditionModel`` on scaled VAE latents, cross-attending to caption states.

    Args:
        codec: frozen VAE (``vae=...``); conditioner: tokenizer + text encoder (``text_encoder=...``).
        resolution, image_channels: of the training images (``data.*``), checked against the parts.
        unet_lora / text_lora: ``LoraConfig`` to train a LoRA instead of the full UNet / text encoder.
        unet_base_dtype: dtype the frozen base UNet is held in under LoRA (its LoRA stays fp32).
        caption_dropout: P(caption -> "") per example, for classifier-free guidance.
        cache: ``model.cache``, read by ``callbacks/caching.py`` (VAE posteriors and frozen text
            states computed once before training); recorded here with the run's hparams.
        quantization: the ``quantization=`` option the backbone (and frozen text encoders) were loaded
            with (``components/quantization.py``); anything but ``none`` trains an adapter only (QLoRA).
        offload_frozen: the frozen VAE and text encoders stay on the CPU whatever device trains: they
            encode there and only their outputs move (with ``cache``: once, before training).
        group_offload: diffusers' group offloading of the frozen backbone (refused: see ``check_group_offload``).
        export_fused: LoRA runs also write ``<export dir>/fused``, a pipeline with the LoRA merged.
        safety_checker: folder/hub id with ``safety_checker/`` + ``feature_extractor/`` for exports (None = off).
        pretrained, local_files_only: where the parts came from (recorded; Hydra loads the parts).
        **kwargs: the shared ``DiffusionModule`` arguments (``unet``, ``process``, ``sampler``, ``optimizer``, ...).
    """

    hparams_ignore = DiffusionModule.hparams_ignore + ("unet_lora", "text_lora")
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
        quantization: str = "none",
        offload_frozen: bool = False,
        group_offload: str | None = None,
        export_fused: bool = False,
        safety_checker: str | None = None,
        pretrained: str | None = None,
        local_files_only: bool = False,
        **kwargs,
    ) -> None:
        self.check_process(process, sampler)  # before the parts: a wrong process is the first thing to fix
        self.check_parts(unet, codec, conditioner, resolution, image_channels)
        if not 0.0 <= caption_dropout < 1.0:
            raise ConfigError(f"model.caption_dropout={caption_dropout} must be in [0, 1).")
        check_quantized_training(self.family, quantization, unet, unet_lora, export_fused)
        check_group_offload(group_offload)
        if text_lora is None and not conditioner.frozen and any(is_quantized(e) for e in conditioner.encoders):
            raise ConfigError(
                f"text_encoder.trainable=true with quantization={quantization}: the text encoders were quantized while loaded "
                f"(quantization.text_encoders=true) and cannot be fine-tuned in full. Set quantization.text_encoders=false, or "
                f"train a LoRA on them instead (adapter.train_text_encoder=true, text_encoder.trainable=false)."
            )
        if unet_lora is not None:
            add_lora(unet if is_quantized(unet) else unet.to(torch_dtype(unet_base_dtype)), unet_lora)
        elif unet_base_dtype != "float32":
            raise ConfigError(
                f"adapter.base_dtype={unet_base_dtype} holds the frozen UNet of a LoRA in half precision, but "
                f"adapter=none trains the whole UNet, whose weights must stay float32; use trainer.precision=bf16-mixed instead."
            )
        if text_lora is not None:
            for encoder in conditioner.encoders:
                add_lora(encoder, text_lora)
        if gradient_checkpointing and not conditioner.frozen:
            for encoder in conditioner.encoders:
                encoder.gradient_checkpointing_enable()
        super().__init__(unet, process, sampler, optimizer, codec=codec, conditioner=conditioner, resolution=resolution, gradient_checkpointing=gradient_checkpointing, **kwargs)
        if offload_frozen and not conditioner.frozen:
            raise ConfigError(
                "model.offload_frozen=true keeps the frozen text encoders and VAE on the CPU, but the text encoder trains "
                "(text_encoder.trainable or adapter.train_text_encoder); set model.offload_frozen=false or freeze it."
            )
        self.train()  # from_pretrained returns eval-mode models; Lightning keeps the mode it finds

    @staticmethod
    def check_parts(unet, codec, conditioner, resolution: int, image_channels: int) -> None:
        """ConfigError naming the keys when the parts disagree (``components/checks.py``); the
        transformer families (``modules/sd3.py``, ``flux.py``) check their own backbone."""
        check_latent_parts(unet, codec, conditioner, resolution, image_channels)

    # ---- frozen parts on the CPU (model.offload_frozen) ----------------------------------------
    def _apply(self, fn, recurse: bool = True):
        """Device and dtype moves (``.to``, Lightning's) skip the codec and conditioner under
        ``offload_frozen``: they stay registered (checkpoints hold them) but on the CPU; the codec
        takes its inputs to its own device and the text states are brought back by ``_text``."""
        if not self.hparams.get("offload_frozen"):
            return super()._apply(fn, recurse)
        frozen = {name: self._modules.pop(name) for name in ("codec", "conditioner")}
        try:
            return super()._apply(fn, recurse)
        finally:
            self._modules.update(frozen)

    def _text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """``text_states`` on this module's device (the encoders may sit on the CPU)."""
        return {k: v.to(self.device) for k, v in self.text_states(captions).items()}

    # ---- text conditioning ----------------------------------------------------------------
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
            states = self._text(captions)
        return states

    def sampling_conditioning(self, cond_batch: dict | None, n: int):
        """Prompts from ``cond_batch["caption"]`` (else empty); the unconditional half is ""."""
        captions = list(cond_batch["caption"]) if cond_batch and "caption" in cond_batch else [""] * n
        return self._text(captions), self._text([""] * n)

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
        return self._text([""])


def check_group_offload(group_offload: str | None) -> None:
    """``model.group_offload`` is refused: diffusers' group offloading swaps each block's parameters
    between devices with forward hooks (``param.data = ...``), while a LoRA trains inside those
    blocks: the backward pass needs the frozen weights the hooks have already moved away, and the
    optimizer would hold parameters whose storage the hooks replace. diffusers supports it for
    inference only."""
    if group_offload is None:
        return
    raise ConfigError(
        f"model.group_offload={group_offload}: diffusers' group offloading moves the backbone's blocks off the device after "
        f"their forward pass, but training needs them again in backward and the LoRA's parameters live in the same blocks, so "
        f"it does not train (diffusers supports it for inference). Set model.group_offload=null; to save memory use "
        f"quantization=nf4|int8|float8, model.gradient_checkpointing=true and model.offload_frozen=true."
    )
