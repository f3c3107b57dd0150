"""Score the demo DDPM: are its samples recognisable digits of all ten classes?

    .venv/bin/python experiments/ddpm_digits/score.py --pipeline outputs/ddpm_digits/runs/<date>/pipeline

Draws N unconditional samples (fixed seed), classifies them with the digit classifier trained on
real digits (diffusion_lab.metrics.digits), and compares with held-out real digits at the same
resolution. Writes results.json, results.md and samples.png beside this file (or --out).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffusion_lab.checkpoints import load_module
from diffusion_lab.components.schedulers import scheduler_class
from diffusion_lab.metrics.digits import DIGIT_NAMES, score_digit_samples
from diffusion_lab.sample import generate_pixel_images
from diffusion_lab.viz import image_grid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pipeline", help="exported DDPMPipeline folder")
    src.add_argument("--ckpt", help="or a training checkpoint (EMA weights)")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--scheduler", default="ddim", help="ddpm | ddim | dpmpp | euler | heun | pndm")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent))
    args = p.parse_args()

    if args.pipeline:
        from diffusers import DDPMPipeline

        pipe = DDPMPipeline.from_pretrained(args.pipeline)
        unet, scheduler_config = pipe.unet, pipe.scheduler.config
    else:
        module = load_module(args.ckpt, use_ema=True)
        unet, scheduler_config = module.base_unet, module.noise_scheduler.config
    scheduler = scheduler_class(args.scheduler).from_config(scheduler_config)
    t0 = time.perf_counter()
    images = generate_pixel_images(unet.eval(), scheduler, args.num_images, 250, args.steps, args.seed, "cpu")
    seconds = time.perf_counter() - t0
    scores = score_digit_samples(images)
    scores.update({"source": args.pipeline or args.ckpt, "scheduler": args.scheduler, "steps": args.steps, "seed": args.seed, "sampling_seconds": round(seconds, 1)})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(scores, indent=2))
    image_grid(images[:100], rows=10).save(out / "samples.png")
    real = scores["real_heldout"]
    rows = [
        "| | samples | held-out real digits |",
        "|---|---|---|",
        f"| images | {scores['n']} | {real['n']} |",
        f"| mean classifier confidence (max prob) | {scores['confidence']:.3f} | {real['confidence']:.3f} |",
        f"| class-marginal entropy (max {scores['max_entropy']:.3f}) | {scores['marginal_entropy']:.3f} | {real['marginal_entropy']:.3f} |",
        f"| classifier accuracy on real labels | - | {real['accuracy']:.3f} |",
        "",
        "| digit | " + " | ".join(DIGIT_NAMES) + " |",
        "|---|" + "---|" * 10,
        "| samples classified as | " + " | ".join(str(c) for c in scores["class_histogram"]) + " |",
    ]
    (out / "results.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {out / 'samples.png'}")


if __name__ == "__main__":
    main()
