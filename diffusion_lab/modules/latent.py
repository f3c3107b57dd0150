"""Latent text-to-image diffusion, every family: the shared diffusion step on VAE latents,
conditioned on text states of the captions. Differs from a pixel ``DiffusionModule`` in its codec
(a VAE instead of the identity) and its text conditioning: caption dropout, cached text states,
adapters on the text encoders. What differs between SD 1.x, SDXL, SD3, FLUX.1, Qwen-Image, ... is the
``family`` it is given (``diffusion_lab/families/``): prompt encoding, the backbone's call, the
sampling schedule, the exported pipeline. Its export is ``diffusion_lab/export``."""

from __future__ import annotations

import torch

from diffusion_lab.components.adapters import init_adapter_from
from diffusion_lab.components.controlnet import Controlled, ControlNetPart
from diffusion_lab.components.embeddings import TokenEmbedding
from diffusion_lab.components.pretrained import Dtype
from diffusion_lab.components.vae import VAECodec
from diffusion_lab.data.control import CONTROL_KEY
from diffusion_lab.families.base import Family
from diffusion_lab.modules.diffusion_module import DiffusionModule, batch_len
from diffusion_lab.modules.latent_setup import attach_trained_parts, check_offload_frozen, check_parts, check_placeholder_in_captions
from diffusion_lab.utils.errors import ConfigError, DataError


class LatentDiffusion(DiffusionModule):
    """A backbone (UNet or transformer) on scaled VAE latents, conditioned on caption states.

    Args:
        backbone: the denoiser (``backbone=``); family: what this model family does differently
            (``model.family``: ``families/sd.py``, ``sdxl.py``, ``sd3.py``, ``flux.py``, ...).
        codec: frozen VAE (``vae=...``); conditioner: tokenizers + text encoders (``text_encoder=...``).
        resolution, image_channels: of the training images (``data.*``), checked against the parts.
        backbone_lora / text_lora: adapter configs (``adapter=lora|dora|lokr|loha``) to train instead of
            the full backbone / on the text encoders the family's LoRA loader takes.
        backbone_base_dtype: dtype the frozen base backbone is held in under an adapter (the adapter stays fp32).
        caption_dropout: P(caption -> "") per example, for classifier-free guidance.
        text_embedding: ``adapter=textual_inversion``: only new placeholder tokens' embedding rows train, in each
            text encoder the family's loader takes them for (``components/embeddings.py``).
        controlnet: ``controlnet=from_backbone``: train a ControlNet (``components/controlnet.py``) that steers
            the frozen backbone from a control image per example (``data.control`` or a paired
            ``conditioning_image``); backbone, VAE and text encoders stay frozen.
        prior_loss_weight: DreamBooth's prior preservation (Ruiz et al. 2023): with DreamBooth data (batches
            flag class examples ``is_prior``) loss = loss(instance) + w x loss(class), as diffusers'
            ``train_dreambooth.py``; the class images are ``callbacks/dreambooth.py``'s.
        cache: ``model.cache``, read by ``callbacks/caching.py`` (VAE posteriors and frozen text
            states computed once before training); recorded here with the run's hparams.
        cache_text_dir: with ``cache``, the cached text states live in memory-mapped files in this folder
            (``data/caching.disk_states``) instead of RAM (T5's ``[L, 4096]`` states are 5-8 MB a caption).
        quantization: the ``quantization=`` option the backbone (and frozen text encoders) were loaded
            with (``components/quantization.py``); anything but ``none`` trains an adapter only (QLoRA).
        offload_frozen: the frozen VAE and text encoders stay on the CPU whatever device trains: they
            encode there and only their outputs move (with ``cache``: once, before training).
        group_offload: diffusers' group offloading of the frozen backbone (refused: see ``latent_setup.check_group_offload``).
        export_fused: adapter runs also write ``<export dir>/fused``, a pipeline with the adapter merged.
        safety_checker: folder/hub id with ``safety_checker/`` + ``feature_extractor/`` for SD exports (None = off).
        pretrained, local_files_only: where the parts came from (recorded; Hydra loads the parts).
        **kwargs: the shared ``DiffusionModule`` arguments (``process``, ``sampler``, ``optimizer``, ...).
    """

    hparams_ignore = DiffusionModule.hparams_ignore + ("family", "backbone_lora", "text_lora", "controlnet", "text_embedding", "adapter_init_from")
    # per-image batch entries of the methods that the latent cache must carry along (when present)
    method_batch_keys: tuple[str, ...] = ("is_prior", CONTROL_KEY)

    def __init__(
        self,
        backbone: torch.nn.Module,
        process,
        sampler,
        optimizer,
        codec: VAECodec,
        conditioner,
        family: Family,
        resolution: int,
        image_channels: int = 3,
        backbone_lora=None,
        text_lora=None,
        backbone_base_dtype: Dtype = "float32",
        caption_dropout: float = 0.0,
        controlnet: ControlNetPart | None = None,
        text_embedding: TokenEmbedding | None = None,
        prior_loss_weight: float = 1.0,
        gradient_checkpointing: bool = False,
        cache: bool = False,
        cache_text_dir: str | None = None,
        quantization: str = "none",
        offload_frozen: bool = False,
        group_offload: str | None = None,
        export_fused: bool = False,
        safety_checker: str | None = None,
        pretrained: str | None = None,
        local_files_only: bool = False,
        adapter_init_from: str | None = None,
        **kwargs,
    ) -> None:
        check_parts(
            family, process, sampler, backbone, codec, conditioner, resolution, image_channels, caption_dropout=caption_dropout,
            prior_loss_weight=prior_loss_weight, safety_checker=safety_checker, quantization=quantization, backbone_lora=backbone_lora,
            text_lora=text_lora, backbone_base_dtype=backbone_base_dtype, export_fused=export_fused, group_offload=group_offload,
        )
        net = attach_trained_parts(
            family, backbone, codec, conditioner, backbone_lora=backbone_lora, text_lora=text_lora, backbone_base_dtype=backbone_base_dtype,
            text_embedding=text_embedding, controlnet=controlnet, gradient_checkpointing=gradient_checkpointing,
        )
        super().__init__(backbone, process, sampler, optimizer, codec=codec, conditioner=conditioner, resolution=resolution, gradient_checkpointing=gradient_checkpointing, **kwargs)
        self.family = family
        if adapter_init_from:  # adapter.init_from: the LoRA starts from a file's (before any checkpoint is restored)
            init_adapter_from(self, adapter_init_from)
        self.controlnet = net
        self.control = controlnet
        self.text_embedding = text_embedding
        self._preview: dict | None = None
        if net is not None and gradient_checkpointing:
            net.enable_gradient_checkpointing()
        check_offload_frozen(offload_frozen, conditioner)
        self.train()  # from_pretrained returns eval-mode models; Lightning keeps the mode it finds

    @classmethod
    def check_process(cls, process, sampler) -> None:
        """Checked against the family in ``__init__`` (the family, not the class, knows its processes)."""

    @property
    def option(self) -> str:
        """The ``model=`` option (for messages)."""
        return self.family.name

    @property
    def guide(self):
        """The family's guidance rule (``Family.guide``: classifier-free guidance unless its pipeline differs)."""
        return self.family.guide

    @property
    def text_keys(self) -> tuple[str, ...]:
        """What ``text_states`` returns, and so what the text cache holds per caption."""
        return self.family.text_keys

    @property
    def cached_batch_keys(self) -> tuple[str, ...]:
        """Per-image batch entries besides images and captions that the latent cache must carry along."""
        return (*self.family.cached_batch_keys, *self.method_batch_keys)

    @property
    def cache_states_dir(self) -> str | None:
        """Where ``callbacks/caching.py`` keeps the cached text states (None: in RAM)."""
        return self.hparams.get("cache_text_dir")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The shared step; with DreamBooth data the class examples' loss is weighted by ``prior_loss_weight``."""
        if "is_prior" not in batch or self.method is not None:
            return super().training_step(batch, batch_idx)
        prior = batch["is_prior"].bool()
        losses = {name: self.diffusion_loss(select(batch, keep), train=True) for name, keep in (("instance", ~prior), ("prior", prior)) if keep.any()}
        loss = losses.get("instance", 0.0) + self.hparams.prior_loss_weight * losses.get("prior", 0.0)
        bs = batch_len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in losses.items():
            self.log(f"train/{name}_loss", value, batch_size=bs)
        return loss

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
        """The family's backbone call, written once: floating inputs cast to the backbone's dtype (an
        adapter's base held in bf16/fp16 must also sample without autocast, e.g. on CPU), output fp32."""
        dtype = self.base_backbone.dtype
        cond = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}
        backbone = self.backbone if self.controlnet is None else Controlled(self.backbone, self.controlnet, self.control.conditioning_scale)
        return self.family.forward(backbone, x_t.to(dtype), t, **cond).float()

    def text_states(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Captions -> the backbone's text conditioning (``text_keys``), as the family's pipeline encodes them
        (a textual inversion's multi-vector placeholder expanded first, as the pipelines do)."""
        if self.text_embedding is not None:
            captions = self.text_embedding.expand(list(captions))
        return self.family.text_states(self.conditioner, captions)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.text_embedding is not None:
            self.text_embedding.restore()

    def conditioning(self, batch: dict, train: bool) -> dict[str, torch.Tensor]:
        """``text_states`` of the captions (or the cached ones) and the family's per-example inputs; while
        training each caption is replaced by "" with probability ``caption_dropout`` (the same draw with or
        without the cache)."""
        p = self.hparams.caption_dropout
        drop = torch.rand(batch_len(batch)) < p if train and p > 0 else None
        if self.text_keys[0] in batch:
            states = {k: batch[k] for k in self.text_keys}
            if drop is not None:
                empty = self._empty_states()
                states = {k: torch.where(drop.to(v.device).view(-1, *[1] * (v.ndim - 1)), empty[k].to(v), v) for k, v in states.items()}
        else:
            captions = self._captions(batch)
            if drop is not None:
                captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            states = self._text(captions)
        return {**states, **self.family.conditioning(self, batch, batch_len(batch), sampling=False), **self._control(batch)}

    def sampling_conditioning(self, cond_batch: dict | None, n: int):
        """Prompts from ``cond_batch["caption"]`` (else empty); the unconditional half is the family's
        (the encoded "", zeros for SDXL, none for FLUX.1's embedded guidance)."""
        cond_batch = self._with_preview_controls(cond_batch, n)
        captions = list(cond_batch["caption"]) if cond_batch and "caption" in cond_batch else [""] * n
        extra = {**self.family.conditioning(self, cond_batch, n, sampling=True), **self._control(cond_batch, n)}
        cond = self._text(captions)
        uncond = self.family.unconditional(cond, self._text([""] * n) if self.family.cfg else None)
        return {**cond, **extra}, ({**uncond, **extra} if uncond is not None else None)

    @torch.no_grad()
    def generate(self, n: int, *args, cond_batch: dict | None = None, guidance_scale: float | None = None, **kwargs) -> torch.Tensor:
        """As ``DiffusionModule.generate``. For a family without classifier-free guidance (FLUX.1)
        ``guidance_scale`` is its pipeline's: the embedded guidance (None: the family's default)."""
        if not self.family.cfg:
            cond_batch = {**(cond_batch or {}), **({"guidance_scale": guidance_scale} if guidance_scale is not None else {})}
            guidance_scale = 1.0
        return super().generate(n, *args, cond_batch=cond_batch, guidance_scale=1.0 if guidance_scale is None else guidance_scale, **kwargs)

    def sampling_schedule(self, scheduler, shape, num_inference_steps):
        return self.family.sampling_schedule(self.base_backbone, scheduler, shape, num_inference_steps)

    # ---- ControlNet (controlnet=from_backbone) ----------------------------------------------------
    def _control(self, batch: dict | None, n: int | None = None) -> dict[str, torch.Tensor]:
        """``{"controlnet_cond": ...}``: the batch's control images as the family's ControlNet reads them
        (both halves of guidance see the control, the pipelines' ``guess_mode=False``); {} without a ControlNet."""
        if self.controlnet is None:
            return {}
        if not batch or CONTROL_KEY not in batch:
            raise DataError(
                f"controlnet=from_backbone needs a control image per example ('{CONTROL_KEY}' in the batch), but the batches "
                f"have only {sorted(batch or {})}. Compute one from each image with data.control=edges|strokes|mask, or with "
                f"data=image_folder give a 'conditioning_image' column in metadata.jsonl (the diffusers convention) and set "
                f"data.paired_images={{conditioning_image: {CONTROL_KEY}}}."
            )
        images = batch[CONTROL_KEY][:n] if n is not None else batch[CONTROL_KEY]
        want = self.controlnet.config.get("conditioning_channels", 3)
        if images.shape[1] not in (1, want):
            raise DataError(f"conditioning images have {images.shape[1]} channels but the ControlNet takes {want}; save them as RGB or greyscale.")
        return {"controlnet_cond": self.family.control_input(self, images)}

    def on_fit_start(self) -> None:
        """Edit pairs for a family that takes none are a ConfigError; with a ControlNet: keep the first
        training controls and captions for previews."""
        dm = self.trainer.datamodule
        if self.text_embedding is not None:
            check_placeholder_in_captions(dm, self.text_embedding.placeholder_token)
        keys = getattr(getattr(dm, "dataset", None), "paired_keys", ())
        if "source_pixel_values" in keys and self.family.supports("edit"):
            raise ConfigError(f"data.paired_images gives source images (edit pairs), but model={self.family.name} cannot train on them: {self.family.supports('edit').rstrip('.')}.")
        if self.controlnet is not None and dm is not None and hasattr(dm, "sample_batch"):
            batch = dm.sample_batch(self.control.preview_images)
            if CONTROL_KEY in batch:
                self._preview = {k: batch[k] for k in (CONTROL_KEY, "caption") if k in batch}

    def _with_preview_controls(self, cond_batch: dict | None, n: int) -> dict | None:
        """Sampling a ControlNet without controls: the training controls kept at fit start (cycled), and
        their captions unless ``cond_batch`` has captions."""
        if self.controlnet is None or (cond_batch and CONTROL_KEY in cond_batch):
            return cond_batch
        if self._preview is None:
            raise DataError(f"sampling a ControlNet needs control images: pass cond_batch={{'{CONTROL_KEY}': [N, C, H, W] in [-1, 1]}} (previews take the first training controls).")
        cond_batch = dict(cond_batch or {})
        idx = torch.arange(n) % len(self._preview[CONTROL_KEY])
        cond_batch[CONTROL_KEY] = self._preview[CONTROL_KEY][idx]
        if "caption" not in cond_batch and "caption" in self._preview:
            cond_batch["caption"] = [self._preview["caption"][i] for i in idx.tolist()]
        return cond_batch

    def train(self, mode: bool = True):
        """Under a ControlNet the frozen backbone stays in eval mode, as diffusers' scripts keep it."""
        super().train(mode)
        if getattr(self, "controlnet", None) is not None:
            self.base_backbone.eval()
        return self

    def _captions(self, batch: dict) -> list[str]:
        if "caption" not in batch:
            raise DataError(
                f"model={self.family.name} trains on image-caption pairs but the batches have no 'caption'. Set "
                "data.caption_column (data=image_folder: a metadata.jsonl/csv column or .txt files beside the "
                "images; data=hf: the caption column), or use data=digits_captioned."
            )
        return list(batch["caption"])

    @torch.no_grad()
    def _empty_states(self) -> dict[str, torch.Tensor]:
        return self._text([""])


def select(batch: dict, keep: torch.Tensor) -> dict:
    """The examples of ``batch`` where ``keep`` (``[N]`` bool) is true: tensors and lists alike."""
    idx = keep.nonzero().flatten().tolist()
    return {k: v[keep.to(v.device)] if torch.is_tensor(v) else [v[i] for i in idx] for k, v in batch.items()}
