"""Module -> diffusers pipeline, and the files each model family exports.

| family | full model | LoRA (``adapter=lora``) |
|---|---|---|
| pixel (``DiffusionModule``) | ``DDPMPipeline`` folder | - |
| class-conditional DiT (``model/unet=dit_*``) | ``DiTPipeline`` folder (pixel: no VAE) | - |
| ``LatentDiffusion`` (SD 1.x/2.x) | ``StableDiffusionPipeline`` folder | ``pytorch_lora_weights.safetensors`` + kohya file [+ ``fused/``] |
| ``LatentDiffusionXL`` (SDXL) | ``StableDiffusionXLPipeline`` folder | ``pytorch_lora_weights.safetensors`` [+ ``fused/``] |
| ``LatentDiffusion3`` / ``LatentFlux`` | ``StableDiffusion3Pipeline`` / ``FluxPipeline`` folder | ``pytorch_lora_weights.safetensors`` [+ ``fused/``] (``export/transformers.py``) |
| ``AutoencoderModule`` (VAE stage) | ``AutoencoderKL`` folder, measured ``scaling_factor`` | - |

Every folder loads in plain diffusers (``DiffusionPipeline.from_pretrained``, ``load_lora_weights``)
with the configured sampler as its scheduler. Parts held in half precision are exported as float32
copies. Writes are atomic (``utils/io.atomic_dir``): a crash never leaves half an export.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffusion_lab.components.adapters import KOHYA_FILE, fused_copy, has_lora, kohya_state_dict, lora_metadata, lora_state_dict
from diffusion_lab.components.backbones import is_dit
from diffusion_lab.export.transformers import build_mmdit_pipeline, is_mmdit, save_mmdit_lora
from diffusion_lab.utils.io import atomic_dir


def _float32(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` itself if it is float32, else a float32 copy (exports load in plain diffusers)."""
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module
    return copy.deepcopy(module).float()


def _text_family(module) -> str | None:
    from diffusion_lab.modules import LatentDiffusion, LatentDiffusionXL

    if isinstance(module, LatentDiffusionXL):
        return "sdxl"
    return "sd" if isinstance(module, LatentDiffusion) else None


def _parts(module, fused: bool) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """(UNet, float32 text encoders) for a pipeline; ``fused``: LoRA merged into float32 copies."""
    unet, encoders = module.base_unet, list(module.conditioner.encoders)
    if fused:
        unet = fused_copy(unet) if has_lora(unet) else _float32(unet)
        encoders = [fused_copy(e) if has_lora(e) else e for e in encoders]
    return unet, [_float32(e) for e in encoders]


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
    """A ``DiTPipeline`` of a class-conditional DiT (``model/unet=dit_*``), ``id2label`` the class ids.
    Latent DiT: transformer + the AutoencoderKL + scheduler, sampled by plain diffusers
    (``pipe(class_labels=[...], guidance_scale=...)``). Pixel DiT: no VAE (``vae`` is null in
    ``model_index.json``): ``transformer/`` and ``scheduler/`` load in plain diffusers, but
    ``DiTPipeline.__call__`` always decodes through a VAE, so pixel samples come from diffusion_lab's
    sampler (``python -m diffusion_lab.sample pipeline=...``). DiTPipeline neither scales x_T by
    ``init_noise_sigma`` nor skips ``scale_model_input``: export with a vp-style sampler (ddim,
    dpmpp, ...), not Euler/Heun/EDM ones."""
    from diffusers import DiTPipeline

    vae = _float32(module.codec.vae) if hasattr(module.codec, "vae") else None
    pipe = DiTPipeline(transformer=module.base_unet, vae=vae, scheduler=module.sampling_scheduler())
    pipe.register_to_config(id2label={str(i): str(i) for i in range(module.conditioner.num_classes)})
    return pipe


def build_pipeline(module, fused: bool = False):
    """A diffusers pipeline of ``module``'s current weights, its scheduler the configured sampler.
    ``fused``: LoRA merged into copies of the base weights (else the live, LoRA-wrapped modules)."""
    if is_mmdit(module):
        return build_mmdit_pipeline(module, fused)
    family = _text_family(module)
    if family is None and is_dit(module.base_unet):
        return _dit_pipeline(module)
    if family is None:
        from diffusers import DDPMPipeline

        return DDPMPipeline(unet=module.base_unet, scheduler=module.sampling_scheduler())
    unet, encoders = _parts(module, fused)
    vae, tokenizers = _float32(module.codec.vae), module.conditioner.tokenizers
    if family == "sd":
        from diffusers import StableDiffusionPipeline

        checker, extractor = _safety_checker(module)
        return StableDiffusionPipeline(
            vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=unet, scheduler=module.sampling_scheduler(),
            safety_checker=checker, feature_extractor=extractor, requires_safety_checker=checker is not None,
        )
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
        unet=unet, scheduler=module.sampling_scheduler(), force_zeros_for_empty_prompt=module.hparams.force_zeros_for_empty_prompt,
    )


def export(module, out_dir: str) -> None:
    """Write ``out_dir`` (atomically). A model without LoRA: a pipeline folder
    (``DiffusionPipeline.from_pretrained(out_dir)``). A LoRA run: the LoRA files
    (``pipe.load_lora_weights(out_dir)`` on the base) and, with ``adapter.export_fused``, ``fused/``.
    The VAE stage (``model=autoencoder``): an ``AutoencoderKL`` folder whose ``scaling_factor`` is
    measured on the training data first."""
    from diffusion_lab.modules.autoencoder import AutoencoderModule

    if isinstance(module, AutoencoderModule):
        module.set_scaling_factor()
        with atomic_dir(out_dir) as tmp:
            module.vae.save_pretrained(tmp, safe_serialization=True)
        return
    if not has_lora(module.base_unet):
        with atomic_dir(out_dir) as tmp:
            build_pipeline(module, fused=True).save_pretrained(tmp, safe_serialization=True)
        return
    with atomic_dir(out_dir) as tmp:
        save_lora(module, tmp)
        if module.hparams.get("export_fused"):
            build_pipeline(module, fused=True).save_pretrained(Path(tmp) / "fused", safe_serialization=True)


def save_lora(module, out_dir: str) -> None:
    """The LoRA weights into ``out_dir`` in the layout ``<Pipeline>.load_lora_weights(dir)`` reads
    (UNet + each text encoder that has a LoRA). SD 1.x also gets ``lora_kohya.safetensors``
    (kohya/webui keys, for A1111/ComfyUI); kohya's SDXL layout names UNet blocks differently and is
    not written."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if is_mmdit(module):
        return save_mmdit_lora(module, out_dir)
    family = _text_family(module)
    names = ("text_encoder", "text_encoder_2")
    encoders = {name: e for name, e in zip(names, module.conditioner.encoders) if has_lora(e)}
    pipeline_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipeline_cls.save_lora_weights(
        out_dir,
        unet_lora_layers=lora_state_dict(module.base_unet),
        unet_lora_adapter_metadata=lora_metadata(module.base_unet),
        **{f"{name}_lora_layers": lora_state_dict(e) for name, e in encoders.items()},
        **{f"{name}_lora_adapter_metadata": lora_metadata(e) for name, e in encoders.items()},
        safe_serialization=True,
    )
    if family == "sd" and not module.base_unet.peft_config["default"].use_dora:  # kohya's DoRA layout is unchecked: not written
        config = module.base_unet.peft_config["default"]
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(config.r), "ss_network_alpha": str(config.lora_alpha)}
        save_file(kohya_state_dict({"unet": module.base_unet, **encoders}), str(Path(out_dir) / KOHYA_FILE), metadata=meta)
