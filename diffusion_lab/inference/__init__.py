"""Inference: load what training wrote (a pipeline folder or a checkpoint), pick its sampler,
draw images. ``diffusion_lab.sample``, ``diffusion_lab.evaluate`` and ``experiments/`` use this.

- ``config.py``: the typed configs of ``sample`` and ``evaluate`` (Hydra's ConfigStore).
- ``checkpoints.py``: a trained module rebuilt from a Lightning checkpoint.
- ``generate.py``: pixel models, and ``generate_images``: the one generation helper.
- ``text.py``: text-to-image pipelines (prompts, LoRA, memory savers, the SDXL refiner).
"""
