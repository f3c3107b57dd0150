"""``Family``: what one text-to-image model family does differently from the others.

``LatentDiffusion`` (``modules/latent.py``) is the one latent text-to-image module: VAE codec, text
conditioner, backbone, the shared diffusion step, sampling and export. Everything that differs
between SD 1.x, SDXL, SD3, FLUX.1, Qwen-Image, ... is a ``Family`` object it is given
(``model.family``, built by Hydra), and nothing else:

    text_states(conditioner, captions)   the pipeline's ``encode_prompt``: captions -> backbone kwargs
    conditioning(module, batch, n, ...)  per-example extras (SDXL's time ids, FLUX's embedded guidance,
                                         an edit family's reference latents)
    forward(backbone, x_t, t, **cond)    the backbone's call: packing, position ids, timestep scale
    sampling_schedule(...)               the pipeline's ``set_timesteps`` arguments (shift ``mu``, sigmas)
    pipeline(...) / save_lora(...)       the diffusers pipeline the export writes, and its LoRA files

A new family is one file under ``diffusion_lab/families/`` (a ``Family`` subclass, and its text
conditioner when no existing one matches the pipeline's ``encode_prompt``) plus ``conf/model/<name>.yaml``.
Methods (``adapter=``, DreamBooth's ``model.prior_loss_weight``, textual inversion, ControlNet,
edit training) are parts that work with any family whose ``supports`` says so.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch

from diffusion_lab.utils.errors import ConfigError

FLOW_ONLY = (
    "the pipeline samples with FlowMatchEulerDiscreteScheduler: the transformer was trained by flow matching on the "
    "pipeline's own (shifted) schedule; use process=flow_matching_pretrained (the model's default) or process=flow_matching."
)


def filter_set_timesteps(scheduler, **kwargs) -> dict:
    """The ``set_timesteps`` arguments ``scheduler`` takes (a DPM-Solver has no ``mu``), None dropped."""
    accepted = inspect.signature(scheduler.set_timesteps).parameters
    return {k: v for k, v in kwargs.items() if k in accepted and v is not None}


def control_latents(module, images: torch.Tensor) -> torch.Tensor:
    """Control images ``[N, C, H, W]`` in [-1, 1] -> their latents ``[N, c, h, w]``, scaled and shifted as the
    latents themselves (the posterior mean): what transformer ControlNets read (the ControlNet pipelines'
    ``vae.encode`` of the control image)."""
    return module.codec.encode(images.to(module.device), sample=False)


def _version() -> str:
    import diffusers

    return diffusers.__version__


def source(module) -> str:
    """`` (from <folder or hub id>)`` of a loaded diffusers / transformers model, for messages."""
    name = getattr(getattr(module, "config", None), "_name_or_path", "") or ""
    return f" (from {name})" if name else ""


class Family:
    """Base of the model families. Subclasses set the class attributes and override what differs.

    Class attributes:
        name: the ``model=`` option (``latent_flux``), used in messages.
        pipeline_class: the diffusers pipeline the export writes (``"FluxPipeline"``).
        backbone_name: the backbone's component name in that pipeline (``"unet"`` | ``"transformer"``).
        encoder_names, tokenizer_names: the text parts' component names, in ``conditioner.encoders`` order.
        processes, process_limits: the ``process=`` kinds this family trains, and why others are refused.
        text_keys: the keys ``text_states`` returns (the latent / text cache holds exactly these).
        cfg: previews and exports run classifier-free guidance (False: FLUX.1's embedded guidance).
        cached_batch_keys: per-image batch entries ``conditioning`` reads that the latent cache must keep.
        controlnet_pipeline_class: the diffusers ControlNet pipeline of the family (None: no ControlNet here).
    """

    name: ClassVar[str] = ""
    pipeline_class: ClassVar[str] = ""
    backbone_name: ClassVar[str] = "transformer"
    encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)
    processes: ClassVar[tuple[str, ...]] = ("flow_matching",)
    process_limits: ClassVar[str] = FLOW_ONLY
    text_keys: ClassVar[tuple[str, ...]] = ("encoder_hidden_states",)
    cfg: ClassVar[bool] = True
    cached_batch_keys: ClassVar[tuple[str, ...]] = ()
    # trains on edit pairs: a source image per example (FLUX.1 Kontext, Qwen-Image-Edit)
    edits: ClassVar[bool] = False
    # the diffusers pipeline that runs this family with a ControlNet (None: ``controlnet=`` is refused)
    controlnet_pipeline_class: ClassVar[str | None] = None
    # why a method is refused for this family: {method: reason}; a method not listed is supported
    refuses: ClassVar[dict[str, str]] = {}

    # ---- checks, before training ---------------------------------------------------------------
    def check_parts(self, backbone, codec, conditioner, resolution: int, image_channels: int) -> None:
        """ConfigError naming the keys when the parts disagree (channels, text widths, resolution)."""

    def supports(self, method: str) -> str | None:
        """None when ``method`` (``diffusion_lab/families/matrix.py``: ``full``, ``lora``, ``dora``, ``lokr``,
        ``dreambooth``, ``textual_inversion``, ``controlnet``, ``edit``) works with this family, else the reason
        it does not (a ConfigError names both keys with it). ``refuses`` overrides the defaults here."""
        if method in self.refuses:
            return self.refuses[method]
        if method == "controlnet" and (not self.controlnet_pipeline_class or self.edits):  # an edit family's parent's is text-to-image
            return f"diffusers {_version()} has no ControlNet pipeline for {self.pipeline_class}"
        if method == "edit" and not self.edits:
            return "a text-to-image family: edit pairs (a source image per example) train an edit family (latent_flux_kontext, latent_qwen_image_edit)"
        if method == "textual_inversion":
            return f"textual inversion is wired for the CLIP token tables of SD 1.x, SDXL, SD3 and FLUX.1 (and their loaders), not for {self.pipeline_class}"
        return None

    def control_input(self, module, images: torch.Tensor) -> torch.Tensor:
        """Control images ``[N, C, H, W]`` in [-1, 1] -> what the family's ControlNet reads. Default: a UNet
        ControlNet's ``[N, 3, H, W]`` in [0, 1] (grey controls repeated to RGB, as the pipelines' image
        processor converts them); transformer ControlNets read VAE latents (``families/sd3.py``, ``flux.py``)."""
        from diffusers.image_processor import VaeImageProcessor

        images = VaeImageProcessor.denormalize(images.to(module.device).float())
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    # ---- conditioning --------------------------------------------------------------------------
    def text_states(self, conditioner, captions: list[str]) -> dict[str, torch.Tensor]:
        """Captions -> the backbone's text inputs (keys ``text_keys``), exactly the pipeline's
        ``encode_prompt`` (padded to a fixed length, with the mask where the backbone takes one)."""
        return conditioner(captions)

    def conditioning(self, module, batch: dict | None, n: int, sampling: bool) -> dict[str, torch.Tensor]:
        """Extra per-example backbone inputs beyond the text states (``batch``: the training batch, or the
        ``cond_batch`` of sampling, possibly None). Default: none."""
        return {}

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """The pipeline's guidance rule on the two predictions: classifier-free guidance ``u + w (c - u)``
        (Ho & Salimans 2022) unless the family's pipeline computes another (Qwen-Image, Z-Image)."""
        return uncond + scale * (cond - uncond)

    def edit_sources(self, module, batch: dict | None, n: int, sampling: bool) -> torch.Tensor:
        """An edit family's source images ``[n, C, H, W]`` in [-1, 1] (``source_key`` of the batch, cycled to ``n``);
        previews without sources (the sample grids give prompts only) take the first ``preview_sources`` training
        sources, kept once. A ConfigError naming ``data.paired_images`` when there are none."""
        source = (batch or {}).get(self.source_key)
        if source is None and sampling:
            if getattr(self, "_previews", None) is None:
                from diffusion_lab.compat.lightning import attached_trainer

                datamodule = getattr(attached_trainer(module), "datamodule", None)
                if datamodule is not None and hasattr(datamodule, "sample_batch"):
                    self._previews = datamodule.sample_batch(self.preview_sources).get(self.source_key)
            source = getattr(self, "_previews", None)
        if source is None:
            raise ConfigError(
                f"model={self.name} edits a source image, but the batch has no {self.source_key!r} (keys: {sorted(batch) if batch else []}). "
                f"Use data=image_folder with a metadata column naming each image's source file and "
                f"data.paired_images='{{source_image: {self.source_key}}}'; to sample, pass cond_batch={{{self.source_key!r}: [N, C, H, W] in [-1, 1]}}."
            )
        return source[torch.arange(n) % source.shape[0]]  # one source per image (cycled, as previews cycle prompts)

    def unconditional(self, cond: dict, uncond: dict) -> dict | None:
        """The negative half of classifier-free guidance from the encoded "" (``uncond``); None: no CFG."""
        return uncond if self.cfg else None

    # ---- the backbone ----------------------------------------------------------------------------
    def forward(self, backbone: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """``backbone`` on latents ``[N, c, h, w]`` (already in the backbone's dtype) at the process's
        timesteps ``t`` -> its prediction ``[N, c, h, w]``. Families with packed tokens pack and unpack here."""
        raise NotImplementedError

    def sampling_schedule(self, backbone, scheduler, shape: tuple[int, ...], num_inference_steps: int) -> dict | None:
        """Extra ``set_timesteps`` arguments the pipeline passes (None: none)."""
        return None

    # ---- export ----------------------------------------------------------------------------------
    def pipeline_parts(self, backbone, vae, scheduler, encoders, tokenizers) -> dict[str, Any]:
        """The keyword arguments of ``pipeline_class(...)`` (override for extra components)."""
        parts = {self.backbone_name: backbone, "vae": vae, "scheduler": scheduler}
        parts.update(zip(self.encoder_names, encoders))
        parts.update(zip(self.tokenizer_names, tokenizers))
        return parts

    def pipeline(self, backbone, vae, scheduler, encoders, tokenizers, **extra):
        """A diffusers ``pipeline_class`` of these parts (``export/pipelines.py`` saves it); ``extra``:
        further components (SD's safety checker)."""
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        return cls(**self.pipeline_parts(backbone, vae, scheduler, list(encoders), list(tokenizers)), **extra)

    def lora_text_encoders(self, conditioner) -> tuple[torch.nn.Module, ...]:
        """The text encoders ``adapter.train_text_encoder`` puts a LoRA on: those the pipeline's LoRA
        loader has a slot for (default: every encoder, named ``encoder_names``)."""
        return tuple(conditioner.encoders)

    def save_lora(self, out_dir: str, backbone: torch.nn.Module, encoders: dict[str, torch.nn.Module]) -> None:
        """LoRA files ``<pipeline_class>.load_lora_weights(out_dir)`` reads, written by the pipeline's
        own ``save_lora_weights`` (``encoders``: component name -> text encoder carrying a LoRA)."""
        import diffusers

        from diffusion_lab.components.adapters import lora_metadata, lora_state_dict

        kwargs = {f"{self.backbone_name}_lora_layers": lora_state_dict(backbone), f"{self.backbone_name}_lora_adapter_metadata": lora_metadata(backbone)}
        for name, encoder in encoders.items():
            kwargs[f"{name}_lora_layers"], kwargs[f"{name}_lora_adapter_metadata"] = lora_state_dict(encoder), lora_metadata(encoder)
        getattr(diffusers, self.pipeline_class).save_lora_weights(out_dir, safe_serialization=True, **kwargs)

    # ---- helpers for subclasses ----------------------------------------------------------------------
    def check_process(self, kind: str) -> None:
        if kind not in self.processes:
            raise ConfigError(f"process={kind} cannot be used with model={self.name} (it trains {', '.join(self.processes)}): {self.process_limits}")
