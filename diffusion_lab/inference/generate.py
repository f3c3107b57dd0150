"""Load a trained model for sampling and draw images from it (pixel and text-to-image).

The sampler is ``cfg.sampler`` (a ``conf/sampler`` option, e.g. ``sampler=dpmpp``) or, when it is
null, the one the model was trained with: the scheduler saved in the pipeline folder, or the
``sampler`` of the checkpoint's config. Either way it is built fresh from the trained schedule.
"""

from __future__ import annotations

import inspect

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from diffusion_lab.components.shapes import sample_size
from diffusion_lab.data.transforms import image_grid, to_pil
from diffusion_lab.diffusion.sampling import Sampler, process_kind, sample_batches
from diffusion_lab.utils.errors import ConfigError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def chosen_sampler(cfg: DictConfig) -> Sampler | None:
    """``cfg.sampler`` built, or None (= the trained one)."""
    return instantiate(cfg.sampler) if cfg.get("sampler") else None


@dataclass
class PixelModel:
    """An unconditional / class-conditional pixel network with its sampler: ``make_scheduler()``
    gives a fresh scheduler (they hold state); ``kind`` is the process it was trained with."""

    backbone: torch.nn.Module
    make_scheduler: Callable[[], object]
    kind: str
    classes: int | None = None  # a DiT's label count (its config holds the label table's size)

    @property
    def scheduler_name(self) -> str:
        return type(self.make_scheduler()).__name__

    @property
    def num_classes(self) -> int | None:
        return self.classes or self.backbone.config.get("num_class_embeds") or None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = sample_size(self.backbone.config)
        return (self.backbone.config.in_channels, size, size)

    def generate(self, num_images: int, batch_size: int, num_inference_steps: int, seed: int = 0, device="cpu", noise: torch.Tensor | None = None, progress: bool = True) -> torch.Tensor:
        """``[num_images, C, H, W]`` in [-1, 1] (classes 0..K-1 in turn for class-conditional UNets)."""
        unet = self.backbone.to(device).eval()
        denoise = lambda x, t, **c: unet(x, t, **c).sample  # noqa: E731
        return sample_batches(denoise, self.make_scheduler, self.sample_shape, num_images, batch_size, num_inference_steps, seed, device, self.num_classes, noise, progress)


def load_pixel_model(cfg: DictConfig, module=None, sampler: Sampler | None = None) -> PixelModel:
    """The UNet and sampler of ``cfg.pipeline`` (a DDPMPipeline folder) or of ``module`` (loaded
    from a checkpoint). ``sampler`` (else ``cfg.sampler``) replaces the trained one."""
    sampler = sampler or chosen_sampler(cfg)
    if module is not None:
        make = lambda: module.sampling_scheduler(sampler)  # noqa: E731
        module.sampling_scheduler(sampler)  # a sampler that cannot run the process fails here
        return PixelModel(module.base_backbone.eval(), make, module.process.kind, getattr(module.conditioner, "num_classes", None))
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(cfg.pipeline, local_files_only=cfg.local_files_only)
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[:1] == [None]}  # a pixel DiTPipeline's vae
    pipe = DiffusionPipeline.from_pretrained(cfg.pipeline, local_files_only=cfg.local_files_only, **absent)
    saved = pipe.scheduler
    kind = process_kind(saved)
    if sampler is not None:
        sampler.scheduler(saved)  # a sampler that cannot run the process fails here
    make = (lambda: sampler.scheduler(saved)) if sampler is not None else (lambda: type(saved).from_config(saved.config))
    if hasattr(pipe, "transformer"):  # a pixel DiTPipeline (export/pipelines.py): unguided, labels 0..K-1 in turn
        return PixelModel(pipe.transformer.eval(), make, kind, len(set(pipe.labels.values())) or None)
    return PixelModel(pipe.unet.eval(), make, kind)


def save_images(images: torch.Tensor, out_dir: str) -> Path:
    """One PNG per image (``000000.png`` ...) and ``grid.png`` into ``out_dir``; returns the grid."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(to_pil(images)):
        im.save(out / f"{i:06d}.png")
    grid = out / "grid.png"
    image_grid(images).save(grid)
    return grid


# ---- text-to-image ----------------------------------------------------------------------------
def load_text_pipeline(cfg: DictConfig, module=None):
    """The text-to-image pipeline of ``cfg.pipeline`` (a folder whose ``model_index.json`` has a
    text encoder) or of a ``LatentDiffusion`` loaded from a checkpoint; None for pixel models."""
    from diffusers import DiffusionPipeline

    from diffusion_lab.components.pretrained import resolve, torch_dtype
    from diffusion_lab.export import build_pipeline
    from diffusion_lab.modules import LatentDiffusion

    if module is not None:
        return build_pipeline(module) if isinstance(module, LatentDiffusion) else None
    source = resolve(cfg.pipeline, None, key="pipeline")
    try:
        index = DiffusionPipeline.load_config(source, local_files_only=cfg.local_files_only)
    except (OSError, ValueError) as e:
        raise _load_error(source, "pipeline", e) from e
    if "text_encoder" not in index and "text_encoder_2" not in index:
        return None
    kwargs = {"torch_dtype": torch_dtype(cfg.dtype), "local_files_only": cfg.local_files_only}
    if "safety_checker" in index and not cfg.safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    return DiffusionPipeline.from_pretrained(source, **kwargs)


def read_prompts(cfg: DictConfig) -> list[str]:
    """``prompt`` (a string or list) or ``prompts_file`` (one prompt per line, # comments)."""
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise ConfigError(f"prompts_file={cfg.prompts_file!r} does not exist; give a text file with one prompt per line.")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        if not prompts:
            raise ConfigError(f"prompts_file={cfg.prompts_file!r} has no prompts (one per line; lines starting with # are skipped).")
        return prompts
    if cfg.prompt is None:
        raise ConfigError("a text-to-image pipeline needs prompt='...' (or a list) or prompts_file=FILE (one prompt per line).")
    return [cfg.prompt] if isinstance(cfg.prompt, str) else [str(p) for p in cfg.prompt]


def prepare_pipeline(pipe, cfg: DictConfig, device: torch.device):
    """Sampler override, LoRA with a scale, memory savers, device."""
    sampler = chosen_sampler(cfg)
    if sampler is not None:
        pipe.scheduler = sampler.scheduler(pipe.scheduler)
    if cfg.get("lora"):
        pipe.load_lora_weights(cfg.lora, adapter_name="lora", local_files_only=cfg.local_files_only)
        pipe.set_adapters(["lora"], adapter_weights=[cfg.lora_scale])
    memory = cfg.memory
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


def generate_text_images(pipe, prompts: list[str], cfg: DictConfig, refiner=None) -> tuple[torch.Tensor, list[str]]:
    """``[num_images, 3, H, W]`` in [-1, 1] for prompts taken in turn, with one seeded generator.
    With a ``refiner`` (SDXL) the base denoises until ``refiner_start`` and hands its latents over."""
    g = torch.Generator().manual_seed(cfg.seed)
    wanted = [prompts[i % len(prompts)] for i in range(cfg.num_images)]
    images = []
    common = dict(num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, generator=g)
    if cfg.get("guidance_rescale"):
        common["guidance_rescale"] = cfg.guidance_rescale
    for b in tqdm(range(0, len(wanted), cfg.batch_size), desc="batches", disable=len(wanted) <= cfg.batch_size):
        batch = wanted[b : b + cfg.batch_size]
        negative = [cfg.negative_prompt] * len(batch) if cfg.negative_prompt else None
        kw = dict(prompt=batch, **({"negative_prompt": negative} if negative else {}), **common)
        if "use_resolution_binning" in inspect.signature(pipe.__call__).parameters:
            kw["use_resolution_binning"] = False  # Sana / PixArt: exactly the height and width asked for
        if refiner is None:
            out = pipe(**kw, height=cfg.height, width=cfg.width, output_type="pt").images
        else:
            latents = pipe(**kw, height=cfg.height, width=cfg.width, denoising_end=cfg.refiner_start, output_type="latent").images
            out = refiner(**kw, image=latents, denoising_start=cfg.refiner_start, output_type="pt").images
        images.append(out.float().cpu() * 2 - 1)
    return torch.cat(images), wanted


def load_refiner(cfg: DictConfig, device: torch.device):
    """The SDXL refiner of ``cfg.refiner`` (a folder or hub id), prepared like the base (no LoRA)."""
    from diffusers import DiffusionPipeline

    from diffusion_lab.components.pretrained import resolve, torch_dtype

    source = resolve(cfg.refiner, None, key="refiner")
    try:
        refiner = DiffusionPipeline.from_pretrained(source, torch_dtype=torch_dtype(cfg.dtype), local_files_only=cfg.local_files_only)
    except (OSError, ValueError) as e:
        raise _load_error(source, "refiner", e) from e
    return prepare_pipeline(refiner, OmegaConf.merge(cfg, {"lora": None}), device)


def _load_error(source: str, key: str, err: Exception) -> ConfigError:
    """A folder without a readable ``model_index.json``, or a hub id that cannot be had offline."""
    from diffusion_lab.components.pretrained import offline_error

    if Path(source).expanduser().is_dir():
        return ConfigError(f"{key}={source!r} has no readable model_index.json ({err}); point it at a diffusers pipeline folder (e.g. <run dir>/pipeline).")
    return offline_error(source, None, key, err)
