from diffusion_lab.diffusion.objectives import (
    PredictionType,
    LossWeighting,
    add_offset_noise,
    diffusion_loss,
    loss_weights,
    predict_x0,
    sample_timesteps,
    snr,
    training_target,
)
from diffusion_lab.diffusion.sampling import sample

__all__ = [
    "PredictionType",
    "LossWeighting",
    "add_offset_noise",
    "diffusion_loss",
    "loss_weights",
    "predict_x0",
    "sample",
    "sample_timesteps",
    "snr",
    "training_target",
]
