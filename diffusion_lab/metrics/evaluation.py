"""Evaluation as a library: the images to score (generated, or a folder), the reference set, and
every metric (FID / KID / IS in a feature space, CLIP score, digit-classifier scores), plus their
logging. ``python -m diffusion_lab.evaluate`` is the command-line wiring of these functions."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from diffusion_lab.data.sources import IMAGE_EXTENSIONS, ImageFolderDataset
from diffusion_lab.data.transforms import ImageTransform
from diffusion_lab.diffusion.sampling import class_labels
from diffusion_lab.inference import generate as G
from diffusion_lab.metrics.distribution import distribution_metrics
from diffusion_lab.metrics.features import FeatureExtractor
from diffusion_lab.utils.errors import ConfigError, DataError
from diffusion_lab.utils.instantiate import instantiate_loggers
from diffusion_lab.utils.results import finish_loggers


@dataclass
class ImageSet:
    """Images ``[N, C, H, W]`` in [-1, 1] with what is known about each: the prompt it was drawn
    for, or its class label (class-conditional models, digits)."""

    images: torch.Tensor
    prompts: list[str] | None = None
    labels: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


# ---- generated images -------------------------------------------------------------------------
def generated_images(cfg: DictConfig, reference_captions: Callable[[], list[str] | None] = lambda: None) -> ImageSet:
    """Samples from ``pipeline`` / ``ckpt_path`` (``diffusion_lab.inference``) or
    the images in ``images_dir``. A text-to-image model without ``prompt``/``prompts_file`` is
    prompted with the distinct ``reference_captions()``."""
    sources = [k for k in ("pipeline", "ckpt_path", "images_dir") if cfg.get(k)]
    if len(sources) != 1:
        raise ConfigError(
            f"give exactly one of pipeline=<diffusers folder>, ckpt_path=<Lightning checkpoint> or images_dir=<folder of images> "
            f"(got {sources or 'none'})."
        )
    if cfg.images_dir:
        return read_image_dir(cfg.images_dir)
    device = G.pick_device(cfg.device)
    module = None
    if cfg.ckpt_path:
        from diffusion_lab.inference.checkpoints import load_module

        module = load_module(cfg.ckpt_path, use_ema=cfg.use_ema, trust=cfg.trust_checkpoint)
    t0 = time.perf_counter()
    pipe = G.load_text_pipeline(cfg, module)
    if pipe is not None:
        prompts = G.read_prompts(cfg) if (cfg.prompt or cfg.prompts_file) else _prompts_from_reference(reference_captions())
        pipe = G.prepare_pipeline(pipe, cfg, device)
        images, used = G.generate_text_images(pipe, prompts, cfg)
        info = {"kind": "text-to-image", "scheduler": type(pipe.scheduler).__name__, "guidance_scale": cfg.guidance_scale}
        return ImageSet(images, prompts=used, info=info | _timing(t0, cfg))
    model = G.load_pixel_model(cfg, module)
    images = model.generate(cfg.num_images, cfg.batch_size, cfg.num_inference_steps, cfg.seed, device)
    labels = class_labels(0, len(images), model.num_classes) if model.num_classes else None  # the order generate draws them in
    info = {"kind": "pixel", "process": model.kind, "scheduler": model.scheduler_name}
    return ImageSet(images, labels=labels, info=info | _timing(t0, cfg))


def _timing(t0: float, cfg: DictConfig) -> dict:
    return {"num_inference_steps": cfg.num_inference_steps, "seed": cfg.seed, "sampling_seconds": round(time.perf_counter() - t0, 2)}


def _prompts_from_reference(captions: list[str] | None) -> list[str]:
    if not captions:
        raise ConfigError(
            "a text-to-image pipeline needs prompts: give prompt='...' or prompts_file=FILE, or a captioned reference "
            "(e.g. data=digits_captioned) whose captions are then used as prompts."
        )
    return sorted(set(captions))


def read_image_dir(root: str) -> ImageSet:
    """Every image under ``root`` at its own size (all must share one size), with prompts from the
    ``prompts.txt`` that ``diffusion_lab.sample`` writes (``file<TAB>prompt``) when present."""
    path = Path(root).expanduser()
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.name != "grid.png") if path.is_dir() else []
    if not files:
        raise DataError(f"images_dir={root!r} has no images ({', '.join(IMAGE_EXTENSIONS)}); point it at a folder of samples, e.g. the out_dir of diffusion_lab.sample.")
    with Image.open(files[0]) as im:
        size, mode = im.size, ("L" if im.mode in ("L", "1", "I", "I;16") else "RGB")
    if size[0] != size[1]:
        raise DataError(f"{files[0]} is {size[0]}x{size[1]}; images_dir scoring expects square samples.")
    ds = ImageFolderDataset(str(path), ImageTransform(size[0], mode=mode, warn_upscale=False))
    ds.files = [f for f in ds.files if f.name != "grid.png"]
    images = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])
    prompts = None
    prompt_file = path / "prompts.txt"
    if prompt_file.is_file():
        table = dict(line.split("\t", 1) for line in prompt_file.read_text().splitlines() if "\t" in line)
        if all(f.name in table for f in ds.files):
            prompts = [table[f.name] for f in ds.files]
    return ImageSet(images, prompts=prompts, info={"kind": "folder", "images_dir": str(path)})


# ---- reference images -------------------------------------------------------------------------
def reference_images(cfg: DictConfig, resolution: int) -> tuple[ImageSet, object]:
    """The reference set at the samples' ``resolution``: ``reference_dir`` (a folder) or the data
    set of the ``data`` config (its ``resolution`` set to the samples'). Returns (set, data set)."""
    if cfg.reference_dir:
        ds = ImageFolderDataset(cfg.reference_dir, ImageTransform(resolution, mode="RGB", warn_upscale=False))
    else:
        data = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=False))
        with open_dict(data):
            if "resolution" in data:
                data.resolution = resolution
        root = OmegaConf.create({"data": data})  # resolve ${data.*} links against the edited copy
        ds = instantiate(root.data.datamodule.dataset)
    n = len(ds) if cfg.num_reference is None else min(int(cfg.num_reference), len(ds))
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].sort().values.tolist()
    items = [ds[i] for i in order]
    images = torch.stack([it["pixel_values"] for it in items])
    prompts = [it["caption"] for it in items] if items and "caption" in items[0] else None
    labels = torch.tensor([it["label"] for it in items]) if items and "label" in items[0] else None
    source = cfg.reference_dir or OmegaConf.select(cfg, "data.datamodule.dataset._target_")
    return ImageSet(images, prompts=prompts, labels=labels, info={"source": str(source), "num_images": n}), ds


# ---- scoring ----------------------------------------------------------------------------------
def score(cfg: DictConfig, fake: ImageSet, real: ImageSet, extractor: FeatureExtractor, is_digits: bool) -> dict:
    """All metrics of ``fake`` against ``real`` as a flat dict of numbers, plus ``digits``."""
    real_f, _ = extractor.extract(real.images, desc="reference features")
    fake_f, fake_logits = extractor.extract(fake.images, desc="sample features")
    metrics = distribution_metrics(real_f, fake_f, fake_logits, kid_subsets=cfg.kid_subsets, kid_subset_size=cfg.kid_subset_size, is_splits=cfg.is_splits)
    if cfg.clip_model and fake.prompts:
        from diffusion_lab.metrics.clip import clip_score

        metrics["clip_score"] = clip_score(fake.images, fake.prompts, cfg.clip_model)
    out = {"metrics": metrics}
    if is_digits:
        from diffusion_lab.metrics.digits import DigitClassifier, labels_from_captions, score_digit_samples

        labels = fake.labels
        if labels is None and fake.prompts:
            template = OmegaConf.select(cfg, "data.caption_template", default="a handwritten digit {name}")
            try:
                labels = torch.tensor(labels_from_captions(fake.prompts, template))
            except ConfigError:
                labels = None  # prompts that name no digit: no prompt accuracy
        classifier = extractor.classifier if hasattr(extractor, "classifier") else DigitClassifier.load_or_train()
        digits = score_digit_samples(fake.images, labels, classifier=classifier)
        out["digits"] = digits
        metrics["digit_confidence"] = digits["confidence"]
        metrics["digit_marginal_entropy"] = digits["marginal_entropy"]
        if "accuracy" in digits:
            metrics["prompt_accuracy" if fake.prompts else "class_accuracy"] = digits["accuracy"]
    return out


def log_results(cfg: DictConfig, result: dict, grid: Path | None) -> None:
    """Scalars to every logger; a W&B table (metric, value) and the sample grid where W&B logs."""
    loggers = instantiate_loggers(cfg.get("logger"))
    try:
        for logger in loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in result["metrics"].items()}, step=0)
            if hasattr(logger, "log_table"):
                rows = [[k, float(v)] for k, v in result["metrics"].items()]
                logger.log_table(key="eval/metrics", columns=["metric", "value"], data=rows)
                if grid is not None:
                    logger.log_image(key="eval/samples", images=[str(grid)])
            logger.finalize("success")
    except BaseException:
        finish_loggers(loggers, failed=True)
        raise
    finish_loggers(loggers)


def format_table(result: dict) -> str:
    rows = [f"{result['num_generated']} samples vs {result['num_reference']} reference images, {result['features']} features", "| metric | value |", "|---|---|"]
    rows += [f"| {k} | {v:.4g} |" for k, v in result["metrics"].items()]
    return "\n".join(rows)
