"""The MMDiT families' parts: loading the transformer of the right pipeline family, and the shape
agreements between transformer, VAE and text encoders (checked when the config is instantiated).

    load_transformer("diffusers.FluxTransformer2DModel", pretrained, family="latent_flux")

A folder (or hub id) of another family, e.g. an SD 1.x folder given to ``model=latent_flux``, is a
``ConfigError`` naming the folder, the pipeline class its ``model_index.json`` says it holds, and the
``model=`` option that trains it, before any weights are read.
"""

from __future__ import annotations

from pathlib import Path

from diffusion_lab.compat.diffusers import pretrained_name
from diffusion_lab.components.pretrained import from_pretrained, resolve
from diffusion_lab.utils.errors import ConfigError

# model= option -> the pipeline classes it trains (model_index.json's _class_name)
FAMILY_PIPELINES = {
    "latent_sd": ("StableDiffusionPipeline",),
    "latent_sdxl": ("StableDiffusionXLPipeline",),
    "latent_sd3": ("StableDiffusion3Pipeline",),
    "latent_flux": ("FluxPipeline",),
    "latent_flux_kontext": ("FluxKontextPipeline", "FluxPipeline"),  # Kontext trains from FLUX.1's weights too
    "latent_chroma": ("ChromaPipeline",),
    "latent_flux2": ("Flux2KleinPipeline",),
    "latent_qwen_image": ("QwenImagePipeline",),
    "latent_qwen_image_edit": ("QwenImageEditPipeline",),
    "latent_sana": ("SanaPipeline",),
    "latent_z_image": ("ZImagePipeline",),
}
# pipelines of a family's relatives that no family trains, and why
NOT_COVERED = {"Flux2Pipeline": "FLUX.2 [dev]: a Mistral text encoder, not covered by model=latent_flux2"}
TINY_FOLDER = {name: f"outputs/tiny_{name.removeprefix('latent_')} --kind {name.removeprefix('latent_')}" for name in FAMILY_PIPELINES}
HUB_EXAMPLE = {
    "latent_sd3": "stabilityai/stable-diffusion-3.5-medium",
    "latent_flux": "black-forest-labs/FLUX.1-dev",
    "latent_flux_kontext": "black-forest-labs/FLUX.1-Kontext-dev",
    "latent_chroma": "lodestones/Chroma1-HD",
    "latent_flux2": "black-forest-labs/FLUX.2-klein-base-4B",
    "latent_qwen_image": "Qwen/Qwen-Image",
    "latent_qwen_image_edit": "Qwen/Qwen-Image-Edit",
    "latent_sana": "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers",
    "latent_z_image": "Tongyi-MAI/Z-Image",
}


def pipeline_class(pretrained: str, local_files_only: bool = False) -> str | None:
    """``_class_name`` of ``pretrained``'s ``model_index.json`` (None when it has none or cannot be read)."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(pretrained, local_files_only=local_files_only).get("_class_name")
    except (OSError, ValueError):
        return None


def check_family(pretrained: str | None, family: str, key: str = "model.pretrained", local_files_only: bool = False) -> None:
    """ConfigError when ``pretrained`` is a pipeline of another family than ``model=family`` trains."""
    source = resolve(pretrained, None, key)
    found = pipeline_class(source, local_files_only)
    expected = FAMILY_PIPELINES[family]
    if found is None or found in expected:
        return
    trains = [f"model={name}" for name, classes in FAMILY_PIPELINES.items() if found in classes]
    where = "folder" if Path(source).is_dir() else "hub id"
    where += f" ({NOT_COVERED[found]})" if found in NOT_COVERED else ""
    raise ConfigError(
        f"{key}={pretrained!r} is a {found} {where} (its model_index.json), but model={family} trains a {' or '.join(expected)}: "
        f"its transformer/, text encoders and flow-matching scheduler are what this family loads. "
        + (f"For this folder use {' or '.join(trains)}; " if trains else "")
        + f"for {family} set {key}={HUB_EXAMPLE[family]} or a local copy "
        f"(python -m diffusion_lab.tiny_sd {TINY_FOLDER[family]} builds a tiny random one offline)."
    )


def load_part(class_name: str, pretrained: str | None, family: str, subfolder: str = "transformer", local_files_only: bool = False, **kwargs):
    """``from_pretrained`` of one part of a family's pipeline (its transformer by default) after ``check_family``:
    whichever part Hydra builds first refuses a folder of another family."""
    check_family(pretrained, family, local_files_only=local_files_only)
    return from_pretrained(class_name, pretrained, subfolder=subfolder, local_files_only=local_files_only, **kwargs)


def _source(module) -> str:
    name = pretrained_name(module.config)
    return f" (from {name})" if name else ""


def check_transformer_parts(family: str, transformer, codec, conditioner, resolution: int, image_channels: int, packing: int) -> None:
    """Latent channels (x ``packing`` ** 2 for Flux's 2x2 packed latents) == the transformer's in/out
    channels; text widths == ``joint_attention_dim`` / ``pooled_projection_dim``; ``data.resolution``
    divisible by the VAE factor x the patch (x the packing); image channels == the VAE's."""
    cfg, problems = transformer.config, []
    channels = codec.latent_channels * packing**2
    for key in ("in_channels", "out_channels"):
        value = cfg.get(key) or cfg.in_channels
        if value != channels:
            packed = f" = {packing}x{packing} packed x vae.latent_channels={codec.latent_channels}" if packing > 1 else " = vae.latent_channels"
            problems.append(
                f"backbone.{key}={value}{_source(transformer)} does not match {channels}{packed}{_source(codec.vae)}: "
                f"the transformer denoises that VAE's latents; use the VAE of the same model.pretrained."
            )
    for key, width, what in (("joint_attention_dim", conditioner.hidden_size, "text_encoder states"), ("pooled_projection_dim", conditioner.pooled_size, "text_encoder pooled embedding")):
        if cfg[key] != width:
            problems.append(
                f"backbone.{key}={cfg[key]}{_source(transformer)} does not match the {what} width {width}: "
                f"use the text encoders of the same model.pretrained as the transformer."
            )
    patch = int(cfg.patch_size) * packing
    factor = codec.downsample_factor * patch
    if resolution % factor:
        ok = max(factor, round(resolution / factor) * factor)
        problems.append(
            f"data.resolution={resolution} is not divisible by {factor} = vae down-sampling {codec.downsample_factor} x "
            f"{'2x2 latent packing' if packing > 1 else 'patch size'} {patch}; use e.g. data.resolution={ok}."
        )
    max_size = cfg.get("pos_embed_max_size")
    if max_size and resolution // factor > max_size:
        problems.append(
            f"data.resolution={resolution} gives {resolution // factor} patches a side, more than the transformer's "
            f"pos_embed_max_size={max_size}{_source(transformer)}; use data.resolution<={max_size * factor}."
        )
    if image_channels != codec.image_channels:
        problems.append(f"data.channels={image_channels} does not match vae.in_channels={codec.image_channels}; model={family} takes RGB images.")
    if problems:
        raise ConfigError(" ".join(problems))


def load_flow_scheduler(pretrained: str | None, local_files_only: bool = False, key: str = "model.pretrained", **overrides):
    """The flow-matching schedule saved at ``pretrained`` (``load_scheduler``); a folder whose saved
    scheduler is not a flow-matching one (an SD 1.x / SDXL folder) is a ConfigError naming it."""
    from diffusion_lab.components.pretrained import load_scheduler

    scheduler = load_scheduler(pretrained, local_files_only=local_files_only, key=key, **overrides)
    c = scheduler.config
    if c.get("use_flow_sigmas"):  # a flow-matching model that ships a DPM-Solver on flow sigmas (Sana): train on its shift
        from diffusers import FlowMatchEulerDiscreteScheduler

        shift = overrides.get("shift") if overrides.get("shift") is not None else c.get("flow_shift", 1.0)
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=overrides.get("num_train_timesteps") or c.num_train_timesteps, shift=shift)
    if not type(scheduler).__name__.startswith("FlowMatch"):
        found = pipeline_class(resolve(pretrained, None, key), local_files_only) or "diffusers pipeline"
        trains = [f"model={name}" for name, classes in FAMILY_PIPELINES.items() if found in classes]
        raise ConfigError(
            f"{key}={pretrained!r} is a {found} whose saved scheduler is a {type(scheduler).__name__}, but "
            f"process=flow_matching_pretrained reads a flow-matching schedule (FlowMatchEulerDiscreteScheduler: SD3 / Flux "
            f"folders, model=latent_sd3 / latent_flux)."
            + (f" For this folder use {' or '.join(trains)} (process=vp_pretrained)." if trains else "")
        )
    return scheduler
