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
from omegaconf import DictConfig, OmegaConf

import diffusion_lab  # noqa: F401  (resolvers)
from diffusion_lab.data.sources import DigitsDataset
from diffusion_lab.inference import generate as G
from diffusion_lab.metrics.evaluation import format_table, generated_images, log_results, reference_images, score
from diffusion_lab.metrics.features import FeatureExtractor
from diffusion_lab.utils.cli import explain_unknown_keys, friendly_errors
from diffusion_lab.utils.config_path import CONFIG_PATH
from diffusion_lab.utils.io import atomic_write_bytes

SCHEMA_VERSION = 1


def run(cfg: DictConfig) -> dict:
    """Generate (or read), embed, score; write ``<out_dir>/metrics.json``; return the result."""
    out = Path(cfg.out_dir)
    configured = OmegaConf.select(cfg, "data.resolution", default=64)
    fake = generated_images(cfg, lambda: reference_images(cfg, configured)[0].prompts)
    real, ds = reference_images(cfg, fake.images.shape[-1])
    extractor: FeatureExtractor = instantiate(cfg.features)
    is_digits = cfg.digit_scores is True or (cfg.digit_scores == "auto" and not cfg.reference_dir and isinstance(ds, DigitsDataset))
    t0 = time.perf_counter()
    result = score(cfg, fake, real, extractor, is_digits)
    grid = None
    if cfg.save_images and not cfg.images_dir:
        grid = G.save_images(fake.images, str(out / "samples"))
        if fake.prompts:
            (out / "samples" / "prompts.txt").write_text("".join(f"{i:06d}.png\t{p}\n" for i, p in enumerate(fake.prompts)))
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
    log_results(cfg, result, grid)
    print(format_table(result))
    print(f"wrote {out / 'metrics.json'}")
    return result


@hydra.main(config_path=CONFIG_PATH, config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with friendly_errors():
        run(cfg)


if __name__ == "__main__":
    with explain_unknown_keys("evaluate"):
        main()
