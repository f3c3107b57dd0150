"""Text-to-image pipelines for sampling: load one (a folder, a hub id or a trained latent module),
read the prompts, put a sampler, a LoRA and the memory savers on it, draw images from it."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusion_lab.diffusion.sampling import Sampler
from diffusion_lab.inference.config import MemorySavers
from diffusion_lab.utils.errors import ConfigError


def load_text_pipeline(pipeline: str | None, module=None, dtype: str = "float32", local_files_only: bool = False, safety_checker: bool = False):
    """The text-to-image pipeline of ``pipeline`` (a folder whose ``model_index.json`` has a text
    encoder, or a hub id) or of a ``LatentDiffusion`` ``module``; None for pixel models."""
    from diffusers import DiffusionPipeline

    from diffusion_lab.components.pretrained import resolve, torch_dtype
    from diffusion_lab.export import build_pipeline
    from diffusion_lab.modules import LatentDiffusion

    if module is not None:
        return build_pipeline(module) if isinstance(module, LatentDiffusion) else None
    source = resolve(pipeline, None, key="pipeline")
    try:
        index = DiffusionPipeline.load_config(source, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise _load_error(source, "pipeline", e) from e
    if "text_encoder" not in index and "text_encoder_2" not in index:
        return None
    kwargs = {"torch_dtype": torch_dtype(dtype), "local_files_only": local_files_only}
    if "safety_checker" in index and not safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    return DiffusionPipeline.from_pretrained(source, **kwargs)


def read_prompts(prompt: str | list[str] | None, prompts_file: str | None = None) -> list[str]:
    """``prompt`` (a string or list) or ``prompts_file`` (one prompt per line, # comments)."""
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise ConfigError(f"prompts_file={prompts_file!r} does not exist; give a text file with one prompt per line.")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        if not prompts:
            raise ConfigError(f"prompts_file={prompts_file!r} has no prompts (one per line; lines starting with # are skipped).")
        return prompts
    if prompt is None:
        raise ConfigError("a text-to-image pipeline needs prompt='...' (or a list) or prompts_file=FILE (one prompt per line).")
    return [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]


def prepare_pipeline(pipe, device: torch.device, sampler: Sampler | None = None, lora: str | None = None, lora_scale: float = 1.0,
                     memory: MemorySavers | None = None, local_files_only: bool = False):  # fmt: skip
    """``pipe`` with ``sampler`` (else its own scheduler), ``lora`` at ``lora_scale``, the memory savers, on ``device``."""
    if sampler is not None:
        pipe.scheduler = sampler.scheduler(pipe.scheduler)
    if lora:
        pipe.load_lora_weights(lora, adapter_name="lora", local_files_only=local_files_only)
        pipe.set_adapters(["lora"], adapter_weights=[lora_scale])
    memory = memory or MemorySavers(False, False, False, False)
    if memory.attention_slicing:
        pipe.enable_attention_slicing()
    if memory.vae_slicing:
        pipe.vae.enable_slicing()
    if memory.vae_tiling:
        pipe.vae.enable_tiling()
    if memory.cpu_offload:
        if device.type != "cuda":
            raise ConfigError("memory.cpu_offload=true moves each model to the GPU only while it runs: it needs device=cuda (or auto with a GPU).")
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_refiner(refiner: str, device: torch.device, sampler: Sampler | None = None, dtype: str = "float32", memory: MemorySavers | None = None,
                 local_files_only: bool = False):  # fmt: skip
    """The SDXL refiner ``refiner`` (a folder or hub id), prepared like the base (its ``sampler``, no LoRA)."""
    from diffusers import DiffusionPipeline

    from diffusion_lab.components.pretrained import resolve, torch_dtype

    source = resolve(refiner, None, key="refiner")
    try:
        pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=torch_dtype(dtype), local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise _load_error(source, "refiner", e) from e
    return prepare_pipeline(pipe, device, sampler, memory=memory, local_files_only=local_files_only)


def generate_text_images(
    pipe,
    prompts: list[str],
    num_images: int,
    batch_size: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int = 0,
    negative_prompt: str | None = None,
    guidance_rescale: float = 0.0,
    height: int | None = None,
    width: int | None = None,
    refiner=None,
    refiner_start: float = 0.8,
) -> tuple[torch.Tensor, list[str]]:
    """``[num_images, 3, H, W]`` in [-1, 1] for ``prompts`` taken in turn, with one seeded generator,
    and the prompt of each image. With a ``refiner`` (SDXL) the base denoises until ``refiner_start``
    and hands its latents over."""
    g = torch.Generator().manual_seed(seed)
    wanted = [prompts[i % len(prompts)] for i in range(num_images)]
    images = []
    common = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=g)
    if guidance_rescale:
        common["guidance_rescale"] = guidance_rescale
    for b in tqdm(range(0, len(wanted), batch_size), desc="batches", disable=len(wanted) <= batch_size):
        batch = wanted[b : b + batch_size]
        kw = dict(prompt=batch, **({"negative_prompt": [negative_prompt] * len(batch)} if negative_prompt else {}), **common)
        if "use_resolution_binning" in inspect.signature(pipe.__call__).parameters:
            kw["use_resolution_binning"] = False  # Sana / PixArt: exactly the height and width asked for
        if refiner is None:
            out = pipe(**kw, height=height, width=width, output_type="pt").images
        else:
            latents = pipe(**kw, height=height, width=width, denoising_end=refiner_start, output_type="latent").images
            out = refiner(**kw, image=latents, denoising_start=refiner_start, output_type="pt").images
        images.append(out.float().cpu() * 2 - 1)
    return torch.cat(images), wanted


def _load_error(source: str, key: str, err: Exception) -> ConfigError:
    """A folder without a readable ``model_index.json``, or a hub id that cannot be had offline."""
    from diffusion_lab.components.pretrained import offline_error

    if Path(source).expanduser().is_dir():
        return ConfigError(f"{key}={source!r} has no readable model_index.json ({err}); point it at a diffusers pipeline folder (e.g. <run dir>/pipeline).")
    return offline_error(source, None, key, err)
