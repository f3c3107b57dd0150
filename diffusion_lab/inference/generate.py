"""Draw images from a trained model: ``generate_images`` is the one generation helper that
``diffusion_lab.sample`` and ``diffusion_lab.evaluate`` share (pixel models here, text-to-image
pipelines through ``inference/text.py``); ``generate_from_config`` reads their typed config.

The sampler is a ``conf/sampler`` option (``sampler=dpmpp``) or, when none is given, the one the
model was trained with: the scheduler saved in the pipeline folder, or the ``sampler`` of the
checkpoint's config. Either way it is built fresh from the trained schedule.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from diffusion_lab.components.shapes import sample_size
from diffusion_lab.data.transforms import image_grid, to_pil
from diffusion_lab.diffusion.sampling import Sampler, class_labels, process_kind, sample_batches
from diffusion_lab.inference.config import SampleConfig


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


@dataclass
class ModuleModel:
    """A ``DiffusionModule`` in memory (training, a loaded checkpoint) drawn through its own
    ``generate``: its codec, conditioning and guidance, with ``sampler`` (None: the configured one)."""

    module: torch.nn.Module
    sampler: Sampler | None = None

    @property
    def num_classes(self) -> int | None:
        return getattr(self.module.conditioner, "num_classes", None)

    @torch.no_grad()
    def generate(self, num_images: int, batch_size: int, num_inference_steps: int, seed: int = 0, guidance_scale: float = 1.0) -> torch.Tensor:
        """``[num_images, C, H, W]`` in [-1, 1] from one generator (classes 0..K-1 in turn, guided
        by ``guidance_scale`` where the network has a null label)."""
        g = torch.Generator().manual_seed(seed)
        images = []
        for start in range(0, num_images, batch_size):
            n = min(batch_size, num_images - start)
            cond_batch = {"label": class_labels(start, n, self.num_classes)} if self.num_classes else None
            scheduler = self.module.sampling_scheduler(self.sampler)
            images.append(self.module.generate(n, num_inference_steps, generator=g, scheduler=scheduler, cond_batch=cond_batch, guidance_scale=guidance_scale).cpu())
        return torch.cat(images)


def load_pixel_model(pipeline: str | None = None, module=None, sampler: Sampler | None = None, local_files_only: bool = False) -> PixelModel:
    """The network and sampler of ``pipeline`` (a DDPMPipeline / pixel DiTPipeline folder) or of
    ``module`` (loaded from a checkpoint). ``sampler`` (else the trained one) draws the images."""
    if module is not None:
        make = lambda: module.sampling_scheduler(sampler)  # noqa: E731
        module.sampling_scheduler(sampler)  # a sampler that cannot run the process fails here
        return PixelModel(module.base_backbone.eval(), make, module.process.kind, getattr(module.conditioner, "num_classes", None))
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(pipeline, local_files_only=local_files_only)
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[:1] == [None]}  # a pixel DiTPipeline's vae
    pipe = DiffusionPipeline.from_pretrained(pipeline, local_files_only=local_files_only, **absent)
    saved = pipe.scheduler
    kind = process_kind(saved)
    if sampler is not None:
        sampler.scheduler(saved)  # a sampler that cannot run the process fails here
    make = (lambda: sampler.scheduler(saved)) if sampler is not None else (lambda: type(saved).from_config(saved.config))
    if hasattr(pipe, "transformer"):  # a pixel DiTPipeline (export/pipelines.py): unguided, labels 0..K-1 in turn
        return PixelModel(pipe.transformer.eval(), make, kind, len(set(pipe.labels.values())) or None)
    return PixelModel(pipe.unet.eval(), make, kind)


def save_images(images: torch.Tensor, out_dir: str | Path, prompts: list[str] | None = None) -> Path:
    """One PNG per image (``000000.png`` ...) and ``grid.png`` into ``out_dir``, and with ``prompts``
    ``prompts.txt`` (``file<TAB>prompt`` per line, what ``images_dir=`` scoring reads); returns the grid."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(to_pil(images)):
        im.save(out / f"{i:06d}.png")
    grid = out / "grid.png"
    image_grid(images).save(grid)
    if prompts:
        (out / "prompts.txt").write_text("".join(f"{i:06d}.png\t{p}\n" for i, p in enumerate(prompts)))
    return grid


@dataclass
class ImageSet:
    """Images ``[N, C, H, W]`` in [-1, 1] with what is known about each: the prompt it was drawn
    for, or its class label (class-conditional models, digits); ``info`` says how they were made."""

    images: torch.Tensor
    prompts: list[str] | None = None
    labels: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


def generate_images(
    model,
    num_images: int,
    batch_size: int,
    num_inference_steps: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    prompts: list[str] | None = None,
    guidance_scale: float = 7.5,
    **text_options,
) -> ImageSet:
    """``num_images`` images from one generator seeded with ``seed``, ``batch_size`` at a time.
    ``model`` is a ``PixelModel`` or a ``ModuleModel`` (class-conditional ones get the classes
    0..K-1 in turn; a ``ModuleModel`` is guided by ``guidance_scale``; ``device``: the module's own)
    or a prepared text-to-image pipeline, given ``prompts`` in turn with ``guidance_scale`` and
    ``text_options`` (``negative_prompt``, ``guidance_rescale``, ``height``, ``width``, ``refiner``,
    ``refiner_start``: ``inference.text.generate_text_images``)."""
    t0 = time.perf_counter()
    if isinstance(model, (PixelModel, ModuleModel)):
        if isinstance(model, PixelModel):
            images = model.generate(num_images, batch_size, num_inference_steps, seed, device)
            info = {"kind": "pixel", "process": model.kind, "scheduler": model.scheduler_name}
        else:
            images = model.generate(num_images, batch_size, num_inference_steps, seed, guidance_scale)
            info = {"kind": "module", "process": model.module.process.kind, "guidance_scale": guidance_scale}
        labels = class_labels(0, len(images), model.num_classes) if model.num_classes else None  # the order generate draws them in
        out = ImageSet(images, labels=labels, info=info)
    else:
        from diffusion_lab.inference.text import generate_text_images

        images, used = generate_text_images(model, prompts, num_images, batch_size, num_inference_steps, guidance_scale, seed, **text_options)
        out = ImageSet(images, prompts=used, info={"kind": "text-to-image", "scheduler": type(model.scheduler).__name__, "guidance_scale": guidance_scale})
    out.info.update(num_inference_steps=num_inference_steps, seed=seed, sampling_seconds=round(time.perf_counter() - t0, 2))
    return out


TRAINED_KEYS = {"num_inference_steps": "sample_steps", "guidance_scale": "sample_guidance"}  # export key -> method attribute


def trained_value(key: Literal["num_inference_steps", "guidance_scale"], module=None, folders: tuple[str | None, ...] = ()):
    """What the model was trained to sample with: a method's ``sample_steps`` / ``sample_guidance``
    (distillation), read from the checkpoint's ``module.method`` or from ``diffusion_lab.json`` in the
    first of ``folders`` (the pipeline, the LoRA) that has one (``export/pipelines.py`` writes it); else None."""
    value = getattr(getattr(module, "method", None), TRAINED_KEYS[key], None)
    for folder in folders:
        record = Path(folder) / "diffusion_lab.json" if folder else None
        if value is None and record is not None and record.is_file():
            value = json.loads(record.read_text()).get(key)
    return value


def generate_from_config(cfg: SampleConfig, reference_prompts: Callable[[], list[str]] | None = None) -> ImageSet:
    """``generate_images`` on the model of ``cfg.pipeline`` / ``cfg.ckpt_path`` with the settings of
    ``cfg`` (``conf/sample.yaml``); no ``num_inference_steps`` / ``guidance_scale``: the trained ones,
    else 50 / 7.5. A text-to-image model given no ``prompt`` / ``prompts_file`` is prompted with
    ``reference_prompts()`` (evaluate: the reference set's captions) where given."""
    from hydra.utils import instantiate

    from diffusion_lab.inference import text

    device = pick_device(cfg.device)
    module = None
    if cfg.ckpt_path:
        from diffusion_lab.inference.checkpoints import load_module

        module = load_module(cfg.ckpt_path, use_ema=cfg.use_ema, trust=cfg.trust_checkpoint)
    sampler = instantiate(cfg.sampler) if cfg.sampler else None
    folders = (cfg.pipeline, cfg.lora)
    steps = cfg.num_inference_steps if cfg.num_inference_steps is not None else int(trained_value("num_inference_steps", module, folders) or 50)
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else float(trained_value("guidance_scale", module, folders) or 7.5)
    pipe = text.load_text_pipeline(cfg.pipeline, module, cfg.dtype, cfg.local_files_only, cfg.safety_checker)
    if pipe is None:
        model = load_pixel_model(cfg.pipeline, module, sampler, cfg.local_files_only)
        return generate_images(model, cfg.num_images, cfg.batch_size, steps, cfg.seed, device)
    given = bool(cfg.prompt or cfg.prompts_file) or reference_prompts is None
    prompts = text.read_prompts(cfg.prompt, cfg.prompts_file) if given else reference_prompts()
    pipe = text.prepare_pipeline(pipe, device, sampler, cfg.lora, cfg.lora_scale, cfg.memory, cfg.local_files_only)
    refiner = text.load_refiner(cfg.refiner, device, sampler, cfg.dtype, cfg.memory, cfg.local_files_only) if cfg.refiner else None
    options = dict(negative_prompt=cfg.negative_prompt, guidance_rescale=cfg.guidance_rescale, height=cfg.height, width=cfg.width, refiner=refiner, refiner_start=cfg.refiner_start)
    return generate_images(pipe, cfg.num_images, cfg.batch_size, steps, cfg.seed, device, prompts, guidance, **options)
