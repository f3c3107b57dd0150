"""Export of the MMDiT families: ``StableDiffusion3Pipeline`` / ``FluxPipeline`` folders and their LoRA files.

| family | full model | LoRA (``adapter=lora``) |
|---|---|---|
| ``LatentDiffusion3`` (SD3 / SD3.5) | ``StableDiffusion3Pipeline`` folder | ``pytorch_lora_weights.safetensors`` (transformer [+ both CLIPs]) [+ ``fused/``] |
| ``LatentFlux`` (FLUX.1) | ``FluxPipeline`` folder | ``pytorch_lora_weights.safetensors`` (transformer [+ CLIP]) [+ ``fused/``] |

The LoRA files are written by the pipeline's own ``save_lora_weights``, so plain diffusers'
``load_lora_weights(dir)`` loads them; the scheduler is the configured sampler on the trained schedule.
"""

from __future__ import annotations


def is_mmdit(module) -> bool:
    from diffusion_lab.modules.sd3 import LatentDiffusion3

    return isinstance(module, LatentDiffusion3)


def _pipeline_class(module):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from diffusion_lab.modules.flux import LatentFlux

    return FluxPipeline if isinstance(module, LatentFlux) else StableDiffusion3Pipeline


def build_mmdit_pipeline(module, fused: bool = False):
    """The ``StableDiffusion3Pipeline`` / ``FluxPipeline`` of ``module``'s weights (``fused``: LoRA merged into float32 copies)."""
    from diffusion_lab.export.pipelines import _float32, _parts

    transformer, encoders = _parts(module, fused)
    cls, tokenizers = _pipeline_class(module), module.conditioner.tokenizers
    common = dict(transformer=transformer, scheduler=module.sampling_scheduler(), vae=_float32(module.codec.vae))
    if cls.__name__ == "FluxPipeline":
        return cls(**common, text_encoder=encoders[0], tokenizer=tokenizers[0], text_encoder_2=encoders[1], tokenizer_2=tokenizers[1])
    t5 = encoders[2] if len(encoders) > 2 else None  # trained without T5: the pipeline puts zeros in its place too
    return cls(
        **common, text_encoder=encoders[0], tokenizer=tokenizers[0], text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
        text_encoder_3=t5, tokenizer_3=tokenizers[2] if t5 is not None else None,
    )


def save_mmdit_lora(module, out_dir: str) -> None:
    """The transformer's LoRA (and the CLIP encoders', when trained) via the pipeline's ``save_lora_weights``."""
    from diffusion_lab.components.adapters import has_lora, lora_metadata, lora_state_dict

    names = ("text_encoder", "text_encoder_2")
    encoders = {name: e for name, e in zip(names, module.conditioner.clip_encoders) if has_lora(e)}
    _pipeline_class(module).save_lora_weights(
        out_dir,
        transformer_lora_layers=lora_state_dict(module.base_unet),
        transformer_lora_adapter_metadata=lora_metadata(module.base_unet),
        **{f"{name}_lora_layers": lora_state_dict(e) for name, e in encoders.items()},
        **{f"{name}_lora_adapter_metadata": lora_metadata(e) for name, e in encoders.items()},
        safe_serialization=True,
    )
