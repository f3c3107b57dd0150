"""Score a model: generate N samples (or read a folder), compare them with a reference set.

    python -m diffusion_lab.evaluate pipeline=outputs/ddpm_digits/runs/<date>/pipeline num_images=1000
    python -m diffusion_lab.evaluate ckpt_path=<run dir>/checkpoints/last.ckpt sampler=ddim num_inference_steps=50
    python -m diffusion_lab.evaluate images_dir=<folder of PNGs> reference_dir=<folder of images> features=inception
    python -m diffusion_lab.evaluate pipeline=<sd run>/pipeline data=digits_captioned clip_model=<CLIP folder>

FID, KID and IS (torchmetrics) in the space of ``features`` (digits | inception | clip); CLIP
score when ``clip_model`` is given and the images have prompts; digit-classifier scores (class
histogram, confidence, prompt/class accuracy) when the reference is scikit-learn digits. Writes
``<out_dir>/metrics.json`` (and the samples as PNGs) and logs to the ``logger`` (a W&B table).
Every generation knob is ``diffusion_lab.sample``'s (this config extends ``sample.yaml``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

import diffusion_lab  # noqa: F401  (resolvers, the typed configs)
from diffusion_lab.data.digits import DigitsDataset
from diffusion_lab.inference.config import EvaluateConfig
from diffusion_lab.inference.generate import generate_from_config, save_images
from diffusion_lab.metrics import evaluation as ev
from diffusion_lab.metrics.features import FeatureExtractor
from diffusion_lab.utils.cli import explain_unknown_keys, friendly_errors
from diffusion_lab.utils.config_path import CONFIG_PATH
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.instantiate import instantiate_loggers
from diffusion_lab.utils.io import atomic_write_bytes

SCHEMA_VERSION = 1


def run(cfg: EvaluateConfig) -> dict:
    """Generate (or read), embed, score; write ``<out_dir>/metrics.json``; return the result."""
    out = Path(cfg.out_dir)
    ev.one_source(cfg.pipeline, cfg.ckpt_path, cfg.images_dir)
    if cfg.digit_scores not in ("auto", True, False):
        raise ConfigError(f"digit_scores={cfg.digit_scores!r}: give auto (when the reference is scikit-learn digits), true or false.")
    reference = lambda resolution: ev.reference_dataset(cfg.reference_dir, cfg.get("data"), resolution)  # noqa: E731
    if cfg.images_dir:
        fake = ev.read_image_dir(cfg.images_dir)
    else:  # a text-to-image model without prompts is prompted with the reference's captions
        configured = OmegaConf.select(cfg, "data.resolution", default=64)
        fake = generate_from_config(cfg, lambda: ev.prompts_from_reference(ev.reference_images(reference(configured), cfg.num_reference).prompts))
    ds = reference(fake.images.shape[-1])
    real = ev.reference_images(ds, cfg.num_reference, cfg.reference_dir or OmegaConf.select(cfg, "data.datamodule.dataset._target_"))
    extractor: FeatureExtractor = instantiate(cfg.features)
    is_digits = cfg.digit_scores is True or (cfg.digit_scores == "auto" and not cfg.reference_dir and isinstance(ds, DigitsDataset))
    t0 = time.perf_counter()
    template = OmegaConf.select(cfg, "data.caption_template", default="a handwritten digit {name}")
    result = ev.score(fake, real, extractor, is_digits, cfg.kid_subsets, cfg.kid_subset_size, cfg.is_splits, cfg.clip_model, template)
    grid = save_images(fake.images, out / "samples", fake.prompts) if cfg.save_images and not cfg.images_dir else None
    result.update(
        {
            "schema_version": SCHEMA_VERSION,
            "features": extractor.name,
            "num_generated": len(fake.images),
            "num_reference": len(real.images),
            "resolution": int(fake.images.shape[-1]),
            "generated": {"source": cfg.pipeline or cfg.ckpt_path or cfg.images_dir, **fake.info},
            "reference": real.info,
            "scoring_seconds": round(time.perf_counter() - t0, 2),
        }
    )
    atomic_write_bytes(out / "metrics.json", (json.dumps(result, indent=2) + "\n").encode())
    ev.log_results(instantiate_loggers(cfg.get("logger")), result, grid)
    print(ev.format_table(result))
    print(f"wrote {out / 'metrics.json'}")
    return result


@hydra.main(config_path=CONFIG_PATH, config_name="evaluate", version_base="1.3")
def main(cfg: EvaluateConfig) -> None:
    with friendly_errors():
        run(cfg)


if __name__ == "__main__":
    with explain_unknown_keys("evaluate"):
        main()
