from diffusion_lab.callbacks.ema import EMACallback, ema_weights
from diffusion_lab.callbacks.export import ExportCallback
from diffusion_lab.callbacks.samples import NoisingStripCallback, SampleGridCallback

__all__ = ["EMACallback", "ExportCallback", "NoisingStripCallback", "SampleGridCallback", "ema_weights"]
