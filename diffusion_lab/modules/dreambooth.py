"""DreamBooth with prior preservation (Ruiz et al. 2023), full or LoRA (``adapter=``).

    python -m diffusion_lab.train experiment=dreambooth_tiny

loss = loss(instance examples) + ``prior_loss_weight`` x loss(class examples), as in diffusers'
``train_dreambooth.py``: the class examples, generated once by the base model before the first
step, keep the class word meaning what it meant while the instance prompt's rare token learns the
subject. The data is ``data/dreambooth.py``; the export is the adapter's (pipeline or LoRA files).
"""

from __future__ import annotations

import torch
from pytorch_lightning.utilities import rank_zero_info

from diffusion_lab.components.text import DualTextConditioner
from diffusion_lab.data.dreambooth import DreamBoothDataset, find_dreambooth_dataset
from diffusion_lab.modules.diffusion_module import batch_len
from diffusion_lab.modules.latent import LatentDiffusion
from diffusion_lab.utils.errors import ConfigError


def select(batch: dict, keep: torch.Tensor) -> dict:
    """The examples of ``batch`` where ``keep`` (``[N]`` bool) is true: tensors and lists alike."""
    idx = keep.nonzero().flatten().tolist()
    return {k: v[keep.to(v.device)] if torch.is_tensor(v) else [v[i] for i in idx] for k, v in batch.items()}


def check_family(kwargs: dict) -> None:
    """ConfigError before training unless the parts are SD 1.x/2.x's (one text encoder, a UNet
    without SDXL's ``text_time`` added conditioning): DreamBooth here extends ``model=latent_sd``."""
    unet, conditioner = kwargs.get("backbone"), kwargs.get("conditioner")
    config = getattr(unet, "config", None) or {}
    encoders = len(getattr(conditioner, "encoders", ())) or 1
    if getattr(kwargs.get("family"), "name", "") == "latent_sdxl" or isinstance(conditioner, DualTextConditioner):
        what = "model=latent_sdxl is SDXL (two text encoders)"
    elif config.get("addition_embed_type") == "text_time":
        what = f"model.pretrained={kwargs.get('pretrained')!r} is an SDXL pipeline (its UNet takes text_time added conditioning)"
    elif encoders != 1:
        what = f"this model has {encoders} text encoders ({type(conditioner).__name__})"
    else:
        return
    raise ConfigError(
        f"DreamBooth here is for SD 1.x/2.x (model=latent_sd: one text encoder), not SDXL (model=latent_sdxl), SD3 or "
        f"FLUX: {what}. Use an SD 1.x/2.x base for model.pretrained, or fine-tune SDXL without prior preservation "
        f"(experiment=sdxl_lora, or experiment=sdxl_finetune_tiny offline)."
    )


class DreamBooth(LatentDiffusion):
    """``LatentDiffusion`` trained on instance + class examples (``is_prior`` in each batch).

    Args:
        prior_loss_weight: weight of the class examples' loss (diffusers' default 1.0).
        class_steps, class_guidance, class_batch_size, class_seed: how the base model generates
            the class images (sampler steps, classifier-free guidance, batch, seed).
        **kwargs: ``LatentDiffusion``'s (``adapter=lora`` for DreamBooth-LoRA).
    """

    method_batch_keys = ("is_prior",)  # the latent cache carries the flag along

    def __init__(
        self,
        prior_loss_weight: float = 1.0,
        class_steps: int = 25,
        class_guidance: float = 7.5,
        class_batch_size: int = 16,
        class_seed: int = 0,
        **kwargs,
    ) -> None:
        if prior_loss_weight < 0:
            raise ConfigError(f"model.prior_loss_weight={prior_loss_weight} must be >= 0.")
        check_family(kwargs)
        super().__init__(**kwargs)

    def dreambooth_data(self) -> DreamBoothDataset:
        dm = getattr(self.trainer, "datamodule", None)
        found = find_dreambooth_dataset(getattr(dm, "dataset", None))
        if found is None:
            raise ConfigError("The DreamBooth model needs DreamBooth data (data=dreambooth or data=dreambooth_digits: instance + class images).")
        return found

    @torch.no_grad()
    def generate_class(self, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        """The base model's images of ``prompts``, ``[N, C, H, W]`` in [-1, 1] (the one sampling loop)."""
        p = self.hparams
        return self.generate(len(prompts), p.class_steps, generator=generator, cond_batch={"caption": prompts}, guidance_scale=p.class_guidance).cpu()

    def setup(self, stage: str) -> None:
        """Before any training step (and before latent caching): the missing class images, made
        by the still untrained model on rank zero while the other ranks wait; a rerun or resume
        with the same ``data.class_dir`` generates nothing."""
        if stage != "fit":
            return
        data = self.dreambooth_data()
        if self.trainer.is_global_zero and data.missing_class_images():
            self.to(self.trainer.strategy.root_device)  # Lightning moves the model only after setup
            g = torch.Generator().manual_seed(self.hparams.class_seed)
            made = data.generate_class_images(lambda prompts: self.generate_class(prompts, g), self.hparams.class_batch_size)
            if made:
                rank_zero_info(f"generated {made} class images in {data.class_dir}")
        self.trainer.strategy.barrier("dreambooth_class_images")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        prior = batch["is_prior"].bool()
        losses = {name: self.diffusion_loss(select(batch, keep), train=True) for name, keep in (("instance", ~prior), ("prior", prior)) if keep.any()}
        # diffusers' train_dreambooth.py: instance loss + prior_loss_weight * class ("prior") loss
        loss = losses.get("instance", 0.0) + self.hparams.prior_loss_weight * losses.get("prior", 0.0)
        bs = batch_len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in losses.items():
            self.log(f"train/{name}_loss", value, batch_size=bs)
        return loss
