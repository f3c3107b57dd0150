"""Evaluation as a library: the images to score (a folder; generated ones come from
``inference.generate``), the reference set, and every metric (FID / KID / IS in a feature space,
CLIP score, digit-classifier scores), plus their logging. ``python -m diffusion_lab.evaluate`` is
the command-line wiring of these functions."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from diffusion_lab.data.image_folder import IMAGE_EXTENSIONS, ImageFolderDataset
from diffusion_lab.data.transforms import ImageTransform
from diffusion_lab.inference.generate import ImageSet
from diffusion_lab.metrics.distribution import distribution_metrics
from diffusion_lab.metrics.features import FeatureExtractor
from diffusion_lab.utils.errors import ConfigError, DataError
from diffusion_lab.utils.results import finish_loggers


# ---- the images to score ----------------------------------------------------------------------
def one_source(pipeline: str | None, ckpt_path: str | None, images_dir: str | None) -> None:
    """Refuse anything but exactly one of the three places images can come from."""
    sources = [k for k, v in (("pipeline", pipeline), ("ckpt_path", ckpt_path), ("images_dir", images_dir)) if v]
    if len(sources) != 1:
        raise ConfigError(
            f"give exactly one of pipeline=<diffusers folder>, ckpt_path=<Lightning checkpoint> or images_dir=<folder of images> "
            f"(got {sources or 'none'})."
        )


def prompts_from_reference(captions: list[str] | None) -> list[str]:
    """The distinct captions of the reference set, sorted: the prompts of a text-to-image model given none."""
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
def reference_dataset(reference_dir: str | None, data: DictConfig | None, resolution: int):
    """The reference data set at the samples' ``resolution``: the folder ``reference_dir``, or the
    data set that the ``data`` group's config builds, with its ``resolution`` set to the samples'."""
    if reference_dir:
        return ImageFolderDataset(reference_dir, ImageTransform(resolution, mode="RGB", warn_upscale=False))
    data = OmegaConf.create(OmegaConf.to_container(data, resolve=False))
    with open_dict(data):
        if "resolution" in data:
            data.resolution = resolution
    root = OmegaConf.create({"data": data})  # resolve ${data.*} links against the edited copy
    return instantiate(root.data.datamodule.dataset)


def reference_images(ds, num_reference: int | None = None, source: str = "") -> ImageSet:
    """``num_reference`` items of ``ds`` (a fixed random subset; None: all of them) as an image set
    with their captions and labels where the data set has them."""
    n = len(ds) if num_reference is None else min(int(num_reference), len(ds))
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].sort().values.tolist()
    items = [ds[i] for i in order]
    images = torch.stack([it["pixel_values"] for it in items])
    prompts = [it["caption"] for it in items] if items and "caption" in items[0] else None
    labels = torch.tensor([it["label"] for it in items]) if items and "label" in items[0] else None
    return ImageSet(images, prompts=prompts, labels=labels, info={"source": str(source), "num_images": n})


# ---- scoring ----------------------------------------------------------------------------------
def score(
    fake: ImageSet,
    real: ImageSet,
    extractor: FeatureExtractor,
    is_digits: bool = False,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_splits: int = 10,
    clip_model: str | None = None,
    caption_template: str = "a handwritten digit {name}",
) -> dict:
    """All metrics of ``fake`` against ``real`` in ``extractor``'s features, as ``{"metrics": {name:
    number}}``; CLIP score with a ``clip_model`` folder and prompts; with ``is_digits`` the digit
    classifier's scores too (``"digits"``; prompts read back to labels with ``caption_template``)."""
    real_f, _ = extractor.extract(real.images, desc="reference features")
    fake_f, fake_logits = extractor.extract(fake.images, desc="sample features")
    metrics = distribution_metrics(real_f, fake_f, fake_logits, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, is_splits=is_splits)
    if clip_model and fake.prompts:
        from diffusion_lab.metrics.clip import clip_score

        metrics["clip_score"] = clip_score(fake.images, fake.prompts, clip_model)
    out = {"metrics": metrics}
    if is_digits:
        from diffusion_lab.metrics.digits import DigitClassifier, labels_from_captions, score_digit_samples

        labels = fake.labels
        if labels is None and fake.prompts:
            try:
                labels = torch.tensor(labels_from_captions(fake.prompts, caption_template))
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


def log_results(loggers: list, result: dict, grid: Path | None) -> None:
    """Scalars to every logger; a W&B table (metric, value) and the sample grid where W&B logs;
    the loggers are finished afterwards (marked failed if logging raised)."""
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
