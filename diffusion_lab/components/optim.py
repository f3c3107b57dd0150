"""Optimizers that need an optional package."""

from __future__ import annotations

from diffusion_lab.utils.errors import ConfigError


def adamw_8bit(params, **kwargs):
    """bitsandbytes' 8-bit AdamW (Dettmers et al. 2022): optimizer state in 8 bits, ~75% less
    optimizer memory. ``model.optimizer._target_=diffusion_lab.components.optim.adamw_8bit``."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ConfigError(
            "model.optimizer is 8-bit AdamW, which needs bitsandbytes (not installed). Install the optional "
            "extra with `pip install -e '.[bnb]'` (`make install` brings it), or use the default optimizer: "
            "model.optimizer._target_=torch.optim.AdamW."
        ) from e
    kwargs.pop("fused", None)  # model.optimizer.fused is torch's AdamW switch; bitsandbytes fuses anyway
    return bnb.optim.AdamW8bit(params, **kwargs)
