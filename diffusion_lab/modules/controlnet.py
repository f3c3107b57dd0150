"""ControlNet training (Zhang et al. 2023): a trainable copy of the UNet's encoder that reads a
conditioning image (edges, strokes, depth, ...) and adds its features to the frozen UNet's skip
connections. ``LatentDiffusion`` with a ``ControlNetModel`` beside the UNet; the UNet, VAE and
text encoder stay frozen, only the ControlNet trains, as in diffusers'
``examples/controlnet/train_controlnet.py``:

    down, mid = controlnet(x_t, t, text, control [0, 1])          # zero convs: 0 at init
    out = unet(x_t, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid)

The control image is the batch's ``conditioning_pixel_values`` (``[N, C, H, W]`` in [-1, 1], the
layout of ``pixel_values``): a ``conditioning_image`` metadata column of ``data=image_folder``
(``data.paired_images``) or a map computed from each image (``data.control=edges|strokes|mask``,
``data/control.py``). Export: ``<run dir>/controlnet``, a ``ControlNetModel`` folder for
``StableDiffusionControlNetPipeline`` (``export/controlnet.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from diffusion_lab.data.control import (
    CONTROL_KEY,
    ControlKind,
    ControlMaps,
    check_control_kind,
)
from diffusion_lab.modules.latent import LatentDiffusion
from diffusion_lab.utils.errors import ConfigError, DataError

# SD 1.x's conditioning embedding: 512 px control -> 64 px latents (three stride-2 convolutions)
SD_CONDITIONING_CHANNELS = (16, 32, 96, 256)


def controlnet_from_unet(
    unet: torch.nn.Module,
    downsample_factor: int,
    pretrained: str | None = None,
    conditioning_embedding_out_channels: Sequence[int] | None = None,
    conditioning_channels: int = 3,
    local_files_only: bool = False,
):
    """A ``ControlNetModel``: loaded from ``pretrained`` (a ControlNet folder or hub id, to go on
    training one), else ``ControlNetModel.from_unet(unet)`` (the UNet's encoder weights, zero
    convolutions). Its conditioning embedding down-samples the control image by the VAE's factor:
    ``conditioning_embedding_out_channels`` has log2(factor) + 1 entries (None: the first ones of
    SD's (16, 32, 96, 256); SD's VAE, factor 8, takes all four)."""
    from diffusers import ControlNetModel

    if pretrained:
        from diffusion_lab.components.pretrained import from_pretrained

        return from_pretrained("diffusers.ControlNetModel", pretrained, local_files_only=local_files_only, key="model.controlnet.pretrained")
    levels = int(math.log2(downsample_factor)) + 1
    channels = tuple(conditioning_embedding_out_channels or SD_CONDITIONING_CHANNELS[:levels])
    if len(channels) != levels or 2 ** (levels - 1) != downsample_factor:
        raise ConfigError(
            f"model.controlnet.conditioning_embedding_out_channels={list(channels)} down-samples the control image "
            f"{2 ** (len(channels) - 1)}x, but the VAE down-samples {downsample_factor}x (vae.block_out_channels): give it "
            f"{levels} entries (e.g. {list(SD_CONDITIONING_CHANNELS[:levels])}), or null to pick them."
        )
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels, conditioning_channels=conditioning_channels)


class ControlNetDiffusion(LatentDiffusion):
    """A frozen SD UNet steered by a trained ``ControlNetModel``.

    Args:
        controlnet: ``(unet, downsample_factor) -> ControlNetModel`` (``controlnet_from_unet``,
            a Hydra ``_partial_``).
        control: ``data.control``: compute the control map from each image (``edges`` | ``strokes``
            | ``mask``; ``data/control.py``); None: the batches carry ``conditioning_pixel_values``
            (``data.paired_images``: the ``conditioning_image`` column).
        conditioning_scale: multiplies the ControlNet residuals (``controlnet_conditioning_scale``
            of the pipeline), in training and previews.
        preview_images: how many training controls (and their captions) previews cycle through when
            the sample grid gives none.
        **kwargs: as ``LatentDiffusion`` (``adapter=none``: the UNet itself is never trained here).
    """

    hparams_ignore = LatentDiffusion.hparams_ignore + ("controlnet",)
    option = "latent_controlnet"
    # the control image travels with the cached latents (model.cache=true)
    cached_batch_keys = (CONTROL_KEY,)

    def __init__(
        self,
        backbone: torch.nn.Module,
        process,
        sampler,
        optimizer,
        codec,
        conditioner,
        family,
        controlnet: Callable[..., torch.nn.Module],
        control: ControlKind | None = None,
        conditioning_scale: float = 1.0,
        preview_images: int = 16,
        **kwargs,
    ) -> None:
        if control is not None:
            check_control_kind(control)
        if kwargs.get("backbone_lora") is not None or kwargs.get("text_lora") is not None:
            raise ConfigError(
                "adapter=lora trains a LoRA on the UNet / text encoder, but model=latent_controlnet keeps both frozen and "
                "trains only the ControlNet; use adapter=none."
            )
        if not conditioner.frozen:
            raise ConfigError(
                "text_encoder.trainable=true: model=latent_controlnet trains only the ControlNet, the text encoder stays "
                "frozen (as in diffusers' train_controlnet.py); set text_encoder.trainable=false."
            )
        net = controlnet(unet=backbone, downsample_factor=codec.downsample_factor)
        backbone.requires_grad_(False)
        super().__init__(backbone, process, sampler, optimizer, codec, conditioner, family, **kwargs)
        self.controlnet = net.train()
        if self.hparams.gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
        self._preview: dict | None = None
        self.train()

    # ---- data: computed control maps --------------------------------------------------------
    def setup(self, stage: str) -> None:
        """With ``control`` set, wrap the datamodule's train/val sets in ``ControlMaps`` (before
        the latent cache of ``model.cache`` runs, at fit start, so the cache keeps the maps)."""
        kind = self.hparams.control
        dm = self.trainer.datamodule if self._trainer is not None else None
        if kind is None or dm is None:
            return
        if not hasattr(dm, "train_set"):
            raise ConfigError(f"data.control={kind} needs the data module of data.datamodule (diffusion_lab.data.DiffusionDataModule).")
        dm.setup(stage)
        for name in ("train_set", "val_set"):
            ds = getattr(dm, name)
            if ds is not None and not isinstance(ds, ControlMaps):
                setattr(dm, name, ControlMaps(ds, kind))

    def on_fit_start(self) -> None:
        """Keep the first training controls and captions for previews (``sampling_conditioning``)."""
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "sample_batch"):
            batch = dm.sample_batch(self.hparams.preview_images)
            if CONTROL_KEY in batch:
                self._preview = {k: batch[k] for k in (CONTROL_KEY, "caption") if k in batch}

    # ---- conditioning -----------------------------------------------------------------------
    def control_input(self, images: torch.Tensor) -> torch.Tensor:
        """``conditioning_pixel_values`` ``[N, C, H, W]`` in [-1, 1] -> what the ControlNet reads:
        ``[N, 3, H, W]`` in [0, 1] (grey controls repeated to RGB, as the pipeline's processor
        converts them)."""
        from diffusers.image_processor import VaeImageProcessor

        images = VaeImageProcessor.denormalize(images.to(self.device).float())
        want = self.controlnet.config.conditioning_channels
        if images.shape[1] != want:
            if images.shape[1] != 1:
                raise DataError(
                    f"conditioning images have {images.shape[1]} channels but the ControlNet takes {want} "
                    f"(model.controlnet.conditioning_channels); save them as RGB or greyscale."
                )
            images = images.expand(-1, want, -1, -1)
        return images

    def _control(self, batch: dict) -> torch.Tensor:
        if CONTROL_KEY not in batch:
            raise DataError(
                f"model=latent_controlnet needs a control image per example ('{CONTROL_KEY}' in the batch), but the batches "
                f"have only {sorted(batch)}. Compute one from each image with data.control=edges|strokes|mask, or with "
                f"data=image_folder give a 'conditioning_image' column in metadata.jsonl (the diffusers convention) and set "
                f"data.paired_images={{conditioning_image: {CONTROL_KEY}}}."
            )
        return self.control_input(batch[CONTROL_KEY])

    def conditioning(self, batch: dict, train: bool) -> dict[str, torch.Tensor]:
        """Text states (with caption dropout) + ``controlnet_cond`` ``[N, 3, H, W]`` in [0, 1]."""
        return {**super().conditioning(batch, train), "controlnet_cond": self._control(batch)}

    def sampling_conditioning(self, cond_batch: dict | None, n: int):
        """Controls from ``cond_batch["conditioning_pixel_values"]``, else the training controls kept
        at fit start (cycled), whose captions are used too unless ``cond_batch`` has captions. Both
        halves of guidance see the control (the pipeline's ``guess_mode=False``)."""
        cond_batch = dict(cond_batch or {})
        if CONTROL_KEY not in cond_batch:
            if self._preview is None:
                raise DataError(
                    f"sampling a ControlNet needs control images: pass cond_batch={{'{CONTROL_KEY}': [N, C, H, W] in [-1, 1]}} "
                    f"(previews during training take the first training controls)."
                )
            idx = torch.arange(n) % len(self._preview[CONTROL_KEY])
            cond_batch[CONTROL_KEY] = self._preview[CONTROL_KEY][idx]
            if "caption" not in cond_batch and "caption" in self._preview:
                cond_batch["caption"] = [self._preview["caption"][i] for i in idx.tolist()]
        cond, uncond = super().sampling_conditioning(cond_batch, n)
        control = self.control_input(cond_batch[CONTROL_KEY][:n])
        return {**cond, "controlnet_cond": control}, {**uncond, "controlnet_cond": control}

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, controlnet_cond: torch.Tensor) -> torch.Tensor:
        """ControlNet residuals into the frozen UNet; inputs cast to the UNet's dtype, output fp32."""
        dtype = self.base_backbone.dtype
        x_t, states = x_t.to(dtype), encoder_hidden_states.to(dtype)
        down, mid = self.controlnet(
            x_t, t, encoder_hidden_states=states, controlnet_cond=controlnet_cond.to(self.controlnet.dtype),
            conditioning_scale=self.hparams.conditioning_scale, return_dict=False,
        )
        out = self.backbone(
            x_t, t, encoder_hidden_states=states,
            down_block_additional_residuals=[d.to(dtype) for d in down], mid_block_additional_residual=mid.to(dtype),
        )
        return out.sample.float()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._logging_step(self.global_step + 1):
            return
        grads = [p.grad for p in self.controlnet.parameters() if p.grad is not None]
        if grads:  # the base class measures the UNet's, which is frozen here
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    def train(self, mode: bool = True):
        """The frozen UNet stays in eval mode (no dropout / norm updates), as diffusers' script keeps it."""
        super().train(mode)
        if hasattr(self, "controlnet"):
            self.base_backbone.eval()
        return self

