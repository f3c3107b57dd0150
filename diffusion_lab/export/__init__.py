"""Export: what a trained module becomes outside diffusion_lab (plain diffusers folders and files).

    build_pipeline(module)        a diffusers pipeline object of the module's current weights
    export(module, out_dir)       full models: a pipeline folder; LoRA runs: LoRA weight files;
                                  ControlNet runs: a ControlNetModel folder; textual inversion:
                                  embedding files; LoKr / LoHa: peft adapter folders (+ fused/)
"""

from diffusion_lab.export.adapters import export_adapter_variant, is_adapter_variant
from diffusion_lab.export.controlnet import build_controlnet_pipeline, is_controlnet, save_controlnet
from diffusion_lab.export.embeddings import is_textual_inversion, save_textual_inversion
from diffusion_lab.export.pipelines import build_pipeline, save_lora
from diffusion_lab.export.pipelines import export as export_pipeline


def export(module, out_dir: str, lora_format: str = "both") -> None:
    """What ``module`` becomes outside diffusion_lab: a ControlNet run's ``ControlNetModel`` folder
    (``export/controlnet.py``), textual inversion's embedding files (``export/embeddings.py``),
    LoKr / LoHa peft folders (``export/adapters.py``), else ``export_pipeline`` (pipeline folders,
    LoRA files in ``lora_format`` = diffusers | kohya | both, the VAE stage)."""
    if is_controlnet(module):
        return save_controlnet(module, out_dir)
    if is_textual_inversion(module):
        return save_textual_inversion(module, out_dir)
    if is_adapter_variant(module):
        return export_adapter_variant(module, out_dir, lora_format)
    return export_pipeline(module, out_dir, lora_format)


__all__ = ["build_controlnet_pipeline", "build_pipeline", "export", "export_pipeline", "save_controlnet", "save_lora"]
