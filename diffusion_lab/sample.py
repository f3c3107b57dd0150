"""Sample from a trained model: pixel DDPMs, and text-to-image with Stable Diffusion / SDXL.

    python -m diffusion_lab.sample pipeline=outputs/ddpm_digits/runs/<date>/pipeline scheduler=ddim num_inference_steps=50
    python -m diffusion_lab.sample ckpt_path=<run dir>/checkpoints/last.ckpt num_images=64
    python -m diffusion_lab.sample pipeline=<run>/pipeline prompt="a handwritten digit seven" guidance_scale=7.5
    python -m diffusion_lab.sample pipeline=<base> lora=<run>/lora lora_scale=0.8 prompts_file=prompts.txt
    python -m diffusion_lab.sample recipe=sdxl_refiner prompt="a lighthouse at dusk"      # SDXL base + refiner

Writes ``<out_dir>/000000.png ...`` (one PNG per image), ``<out_dir>/grid.png`` and, for text
prompts, ``<out_dir>/prompts.txt`` (file name and prompt per line).
"""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

import diffusion_lab  # noqa: F401
from diffusion_lab.components.schedulers import scheduler_class
from diffusion_lab.data.transforms import to_pil
from diffusion_lab.diffusion.sampling import sample
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.run import explain_unknown_keys, friendly_errors
from diffusion_lab.viz import image_grid


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_unet_and_scheduler(cfg: DictConfig, device: torch.device, module=None):
    """(unet, scheduler config) from a pipeline folder or a module loaded from a checkpoint."""
    if module is None:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(cfg.pipeline, local_files_only=cfg.local_files_only)
        return pipe.unet.to(device).eval(), pipe.scheduler.config
    return module.base_unet.to(device).eval(), module.noise_scheduler.config


def generate_pixel_images(unet, scheduler, num_images: int, batch_size: int, num_inference_steps: int, seed: int, device) -> torch.Tensor:
    """``[num_images, C, H, W]`` in [-1, 1], drawn in batches with one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
    out = []
    n_batches = math.ceil(num_images / batch_size)
    for b in tqdm(range(n_batches), desc="batches", disable=n_batches == 1):
        n = min(batch_size, num_images - b * batch_size)
        cond = {}
        if unet.config.num_class_embeds:
            cond = {"class_labels": (torch.arange(n) + b * batch_size).remainder(unet.config.num_class_embeds).to(device)}
        x = sample(
            lambda x, t, **c: unet(x, t, **c).sample,
            scheduler,
            (n, unet.config.in_channels, size, size),
            num_inference_steps,
            generator=g,
            device=device,
            cond=cond,
            progress=True,
        )
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


def save_images(images: torch.Tensor, out_dir: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(to_pil(images)):
        im.save(out / f"{i:06d}.png")
    grid = out / "grid.png"
    image_grid(images).save(grid)
    return grid


def run(cfg: DictConfig) -> Path:
    if bool(cfg.pipeline) == bool(cfg.ckpt_path):
        raise ConfigError("give exactly one of pipeline=<diffusers folder or hub id> or ckpt_path=<Lightning checkpoint>.")
    device = pick_device(cfg.device)
    module = None
    if cfg.ckpt_path:
        from diffusion_lab.checkpoints import load_module

        module = load_module(cfg.ckpt_path, use_ema=cfg.use_ema)
    pipe = load_text_pipeline(cfg, module)
    if pipe is not None:
        return run_text_to_image(cfg, pipe, device)
    unet, scheduler_config = load_unet_and_scheduler(cfg, device, module)
    cls = scheduler_class(cfg.scheduler.class_name) if cfg.get("scheduler") else scheduler_class(scheduler_config["_class_name"])
    scheduler = cls.from_config(scheduler_config)  # a fresh scheduler: they hold state
    images = generate_pixel_images(unet, scheduler, cfg.num_images, cfg.batch_size, cfg.num_inference_steps, cfg.seed, device)
    grid = save_images(images, cfg.out_dir)
    print(f"wrote {len(images)} images and {grid} ({cls.__name__}, {cfg.num_inference_steps} steps)")
    return grid


# ---- text-to-image ----------------------------------------------------------------------------
def load_text_pipeline(cfg: DictConfig, module=None):
    """The text-to-image pipeline of ``cfg.pipeline`` (a folder whose ``model_index.json`` has a
    text encoder) or of a ``LatentDiffusion`` loaded from a checkpoint; None for pixel models."""
    from diffusers import DiffusionPipeline

    from diffusion_lab.components.pretrained import resolve, torch_dtype
    from diffusion_lab.modules import LatentDiffusion

    if module is not None:
        return module.pipeline(fused=False) if isinstance(module, LatentDiffusion) else None
    source = resolve(cfg.pipeline, None, key="pipeline")
    try:
        index = DiffusionPipeline.load_config(source, local_files_only=cfg.local_files_only)
    except (OSError, ValueError) as e:
        raise ConfigError(f"pipeline={cfg.pipeline!r} has no readable model_index.json ({e}); point it at a diffusers pipeline folder or hub id.") from e
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
    """Scheduler override, LoRA with a scale, memory savers, device."""
    if cfg.get("scheduler"):
        pipe.scheduler = scheduler_class(cfg.scheduler.class_name).from_config(pipe.scheduler.config)
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
    for b in tqdm(range(0, len(wanted), cfg.batch_size), desc="batches", disable=len(wanted) <= cfg.batch_size):
        batch = wanted[b : b + cfg.batch_size]
        negative = [cfg.negative_prompt] * len(batch) if cfg.negative_prompt else None
        kw = dict(prompt=batch, negative_prompt=negative, **common)
        if refiner is None:
            out = pipe(**kw, height=cfg.height, width=cfg.width, output_type="pt").images
        else:
            latents = pipe(**kw, height=cfg.height, width=cfg.width, denoising_end=cfg.refiner_start, output_type="latent").images
            out = refiner(**kw, image=latents, denoising_start=cfg.refiner_start, output_type="pt").images
        images.append(out.float().cpu() * 2 - 1)
    return torch.cat(images), wanted


def run_text_to_image(cfg: DictConfig, pipe, device: torch.device) -> Path:
    prompts = read_prompts(cfg)
    pipe = prepare_pipeline(pipe, cfg, device)
    refiner = None
    if cfg.refiner:
        from diffusers import DiffusionPipeline

        from diffusion_lab.components.pretrained import resolve, torch_dtype

        source = resolve(cfg.refiner, None, key="refiner")
        refiner = DiffusionPipeline.from_pretrained(source, torch_dtype=torch_dtype(cfg.dtype), local_files_only=cfg.local_files_only)
        refiner = prepare_pipeline(refiner, OmegaConf.merge(cfg, {"lora": None}), device)
    images, used = generate_text_images(pipe, prompts, cfg, refiner)
    grid = save_images(images, cfg.out_dir)
    (Path(cfg.out_dir) / "prompts.txt").write_text("".join(f"{i:06d}.png\t{p}\n" for i, p in enumerate(used)))
    print(f"wrote {len(images)} images and {grid} ({type(pipe.scheduler).__name__}, {cfg.num_inference_steps} steps, guidance {cfg.guidance_scale})")
    return grid


@hydra.main(config_path="../conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with friendly_errors():
        run(cfg)


if __name__ == "__main__":
    with explain_unknown_keys("sample"):
        main()
