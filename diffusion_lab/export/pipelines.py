"""Module -> diffusers pipeline, and the files each model family exports.

| model | full model | LoRA (``adapter=lora``) |
|---|---|---|
| pixel (``DiffusionModule``) | ``DDPMPipeline`` folder | - |
| class-conditional DiT (``backbone=dit_*``) | ``DiTPipeline`` folder (pixel: no VAE) | - |
| ``LatentDiffusion`` (every text-to-image family) | the family's pipeline folder (``family.pipeline_class``) + ``<run>/model.safetensors`` in the A1111 / ComfyUI layout for SD 1.x, SDXL, SD3, FLUX.1 (``export/single_file.py``) | ``pytorch_lora_weights.safetensors`` by the pipeline's ``save_lora_weights`` (+ ``lora_kohya.safetensors`` for SD 1.x, SDXL, FLUX.1: ``export/kohya.py``) [+ ``fused/``] |
| ``AutoencoderModule`` (VAE stage) | ``AutoencoderKL`` folder, measured ``scaling_factor`` | - |

Every folder loads in plain diffusers (``DiffusionPipeline.from_pretrained``, ``load_lora_weights``)
with the configured sampler as its scheduler; a method that trains for a step count (distillation)
records it in ``diffusion_lab.json``, which ``diffusion_lab.sample`` reads. Parts held in half precision are exported as float32
copies. Writes are atomic (``utils/io.atomic_dir``): a crash never leaves half an export.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from diffusion_lab.components.adapters import fused_copy, has_lora
from diffusion_lab.components.backbones import is_dit
from diffusion_lab.utils.io import atomic_dir


def _float32(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` itself if it is float32, else a float32 copy (exports load in plain diffusers)."""
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module
    return copy.deepcopy(module).float()


def _parts(module, fused: bool) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """(backbone, float32 text encoders) for a pipeline; ``fused``: LoRA merged into float32 copies."""
    backbone, encoders = module.base_backbone, list(module.conditioner.encoders)
    if fused:
        backbone = fused_copy(backbone) if has_lora(backbone) else _float32(backbone)
        encoders = [fused_copy(e) if has_lora(e) else e for e in encoders]
    return backbone, [_float32(e) for e in encoders]


def _safety_checker(module):
    """(safety checker, feature extractor) from ``model.safety_checker`` (None, None when off)."""
    from diffusion_lab.components.pretrained import from_pretrained

    source = module.hparams.get("safety_checker")
    if not source:
        return None, None
    kw = dict(pretrained=source, local_files_only=module.hparams.local_files_only, key="model.safety_checker")
    checker = from_pretrained("diffusers.pipelines.stable_diffusion.safety_checker.StableDiffusionSafetyChecker", subfolder="safety_checker", **kw)
    return checker, from_pretrained("transformers.CLIPImageProcessor", subfolder="feature_extractor", **kw)


def _dit_pipeline(module):
    """A ``DiTPipeline`` of a class-conditional DiT (``backbone=dit_*``), ``id2label`` the class ids.
    Latent DiT: transformer + the AutoencoderKL + scheduler, sampled by plain diffusers
    (``pipe(class_labels=[...], guidance_scale=...)``). Pixel DiT: no VAE (``vae`` is null in
    ``model_index.json``): ``transformer/`` and ``scheduler/`` load in plain diffusers, but
    ``DiTPipeline.__call__`` always decodes through a VAE, so pixel samples come from diffusion_lab's
    sampler (``python -m diffusion_lab.sample pipeline=...``). DiTPipeline neither scales x_T by
    ``init_noise_sigma`` nor skips ``scale_model_input``: export with a vp-style sampler (ddim,
    dpmpp, ...), not Euler/Heun/EDM ones."""
    from diffusers import DiTPipeline

    vae = _float32(module.codec.vae) if hasattr(module.codec, "vae") else None
    pipe = DiTPipeline(transformer=module.base_backbone, vae=vae, scheduler=module.sampling_scheduler())
    pipe.register_to_config(id2label={str(i): str(i) for i in range(module.conditioner.num_classes)})
    return pipe


def build_pipeline(module, fused: bool = False):
    """A diffusers pipeline of ``module``'s current weights, its scheduler the configured sampler.
    ``fused``: LoRA merged into copies of the base weights (else the live, LoRA-wrapped modules)."""
    from diffusion_lab.modules.latent import LatentDiffusion

    if isinstance(module, LatentDiffusion):
        backbone, encoders = _parts(module, fused)
        checker, extractor = _safety_checker(module)
        extra = {"safety_checker": checker, "feature_extractor": extractor} if checker is not None else {}
        return module.family.pipeline(backbone, _float32(module.codec.vae), module.sampling_scheduler(), encoders, module.conditioner.tokenizers, **extra)
    if is_dit(module.base_backbone):
        return _dit_pipeline(module)
    from diffusers import DDPMPipeline

    return DDPMPipeline(unet=module.base_backbone, scheduler=module.sampling_scheduler())


def export(module, out_dir: str, lora_format: str = "both"):
    """Write ``out_dir`` (atomically). A model without LoRA: a pipeline folder
    (``DiffusionPipeline.from_pretrained(out_dir)``). A LoRA run: the LoRA files
    (``pipe.load_lora_weights(out_dir)`` on the base; ``lora_format``: diffusers' file, the kohya one or
    both, ``export/kohya.py``) and, with ``adapter.export_fused``, ``fused/``.
    The VAE stage (``model=autoencoder``): an ``AutoencoderKL`` folder whose ``scaling_factor`` is
    measured on the training data first. Returns the full pipeline it wrote (None for the other kinds)."""
    from diffusion_lab.modules.autoencoder import AutoencoderModule

    if isinstance(module, AutoencoderModule):
        module.set_scaling_factor()
        with atomic_dir(out_dir) as tmp:
            module.vae.save_pretrained(tmp, safe_serialization=True)
        return
    if not has_lora(module.base_backbone):
        pipe = build_pipeline(module, fused=True)
        with atomic_dir(out_dir) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            _record_steps(module, tmp)
        return pipe  # the full pipeline written (the export callback also writes it as a single file)
    with atomic_dir(out_dir) as tmp:
        save_lora(module, tmp, lora_format)
        _record_steps(module, tmp)
        if module.hparams.get("export_fused"):
            build_pipeline(module, fused=True).save_pretrained(Path(tmp) / "fused", safe_serialization=True)


def _record_steps(module, out_dir: str) -> None:
    """``diffusion_lab.json`` with the step count and guidance the method trained for (``Method.sample_steps`` /
    ``sample_guidance``: a distilled student's 2 steps, guidance 1), which ``diffusion_lab.sample`` uses when
    none is given."""
    method = getattr(module, "method", None)
    steps, guidance = getattr(method, "sample_steps", None), getattr(method, "sample_guidance", None)
    record = {**({"num_inference_steps": int(steps)} if steps else {}), **({"guidance_scale": float(guidance)} if guidance else {})}
    if record:
        (Path(out_dir) / "diffusion_lab.json").write_text(json.dumps(record) + "\n")


def save_lora(module, out_dir: str, lora_format: str = "both") -> None:
    """The LoRA weights into ``out_dir`` (backbone + each text encoder that has a LoRA): the layout
    ``<Pipeline>.load_lora_weights(dir)`` reads and / or the kohya / A1111 one (``export/kohya.py``)."""
    from diffusion_lab.export.kohya import lora_encoders, save_lora_files

    save_lora_files(module.family, out_dir, module.base_backbone, lora_encoders(module), lora_format)
