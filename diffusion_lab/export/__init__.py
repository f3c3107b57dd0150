"""Export: what a trained module becomes outside diffusion_lab (plain diffusers folders and files).

    build_pipeline(module)        a diffusers pipeline object of the module's current weights
    export(module, out_dir)       full models: a pipeline folder; LoRA runs: LoRA weight files
"""

from diffusion_lab.export.pipelines import build_pipeline, export, save_lora

__all__ = ["build_pipeline", "export", "save_lora"]
