"""Shape agreements between latent-diffusion parts, checked when the config is instantiated
(not forty minutes into a run). Each message names both config keys and the fix."""

from __future__ import annotations

from diffusion_lab.compat.diffusers import pretrained_name
from diffusion_lab.components.text import DualTextConditioner
from diffusion_lab.utils.errors import ConfigError


def _source(module) -> str:
    name = pretrained_name(module.config)
    return f" (from {name})" if name else ""


def check_latent_parts(unet, codec, conditioner, resolution: int, image_channels: int) -> None:
    """UNet in/out channels == VAE latent channels; cross_attention_dim == text hidden size;
    ``data.resolution`` divisible by VAE x UNet down-sampling; image channels == VAE input."""
    cfg, problems = unet.config, []
    for key in ("in_channels", "out_channels"):
        if cfg[key] != codec.latent_channels:
            problems.append(
                f"backbone.{key}={cfg[key]}{_source(unet)} does not match vae.latent_channels={codec.latent_channels}"
                f"{_source(codec.vae)}: the UNet denoises VAE latents, so use a UNet with {key}={codec.latent_channels} "
                f"or the VAE the UNet was trained with."
            )
    cross = cfg.cross_attention_dim
    if any(int(c) != conditioner.hidden_size for c in (cross if isinstance(cross, (list, tuple)) else [cross])):
        problems.append(
            f"backbone.cross_attention_dim={cross}{_source(unet)} does not match text_encoder.hidden_size="
            f"{conditioner.hidden_size}{_source(conditioner.text_encoder)}: the UNet cross-attends to the text "
            f"encoder's hidden states; pick a text encoder with hidden_size={cross} or a UNet with "
            f"cross_attention_dim={conditioner.hidden_size}."
        )
    factor = codec.downsample_factor * 2 ** (len(cfg.down_block_types) - 1)
    if resolution % factor:
        ok = max(factor, round(resolution / factor) * factor)
        problems.append(
            f"data.resolution={resolution} is not divisible by {factor} = vae down-sampling {codec.downsample_factor} "
            f"(vae.block_out_channels) x UNet down-sampling {factor // codec.downsample_factor} "
            f"(backbone.down_block_types); use e.g. data.resolution={ok}."
        )
    if image_channels != codec.image_channels:
        problems.append(
            f"data.channels={image_channels} does not match vae.in_channels={codec.image_channels}; the SD VAE takes "
            f"RGB images: use an RGB data config (e.g. data=digits_captioned) or set the data transform mode to RGB."
        )
    if problems:
        raise ConfigError(" ".join(problems))


def check_sdxl_parts(unet, conditioner) -> None:
    """SDXL base: two text encoders, and a UNet whose added conditioning (``text_time``) takes the
    pooled text embedding plus 6 time ids, each ``addition_time_embed_dim`` wide."""
    if not isinstance(conditioner, DualTextConditioner):
        raise ConfigError(
            f"model=latent_sdxl conditions on SDXL's two text encoders, but the text_encoder group builds a "
            f"{type(conditioner).__name__}; use text_encoder=sdxl_pretrained (model=latent_sdxl's default)."
        )
    cfg = unet.config
    time_dim = cfg.get("addition_time_embed_dim")
    expected = 6 * time_dim + conditioner.pooled_size if time_dim else None
    found = cfg.get("projection_class_embeddings_input_dim")
    if cfg.get("addition_embed_type") != "text_time" or found != expected:
        raise ConfigError(
            f"backbone{_source(unet)} has addition_embed_type={cfg.get('addition_embed_type')!r} and "
            f"projection_class_embeddings_input_dim={found}, but model=latent_sdxl needs an SDXL base UNet: addition_embed_type="
            f"'text_time' taking the pooled text embedding ({conditioner.pooled_size} = text_encoder_2 projection_dim) plus "
            f"6 time ids x addition_time_embed_dim{f' ({time_dim}) = {expected}' if time_dim else ''}. An SD 1.x/2.x UNet has no added conditioning "
            f"(use model=latent_sd); the SDXL refiner's takes 5 time ids (aesthetic score) and is not trained here."
        )
