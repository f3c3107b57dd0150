"""Score the demo DDPM: are its samples recognisable digits of all ten classes?

    .venv/bin/python experiments/ddpm_digits/score.py --pipeline outputs/ddpm_digits/runs/<date>/pipeline
    .venv/bin/python experiments/ddpm_digits/score.py --pipeline ... --out experiments/ddpm_digits   # refresh the committed results

Draws N unconditional samples (fixed seed, ``--sampler``: a conf/sampler option), classifies them
with the digit classifier trained on real digits (diffusion_lab.metrics.digits), and compares with
held-out real digits at the same resolution. Writes results.json, results.md and samples.png into
a new outputs/experiments/ddpm_digits/<date>_<time>/ (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from diffusion_lab.data.transforms import image_grid
from diffusion_lab.diffusion.sampling import load_sampler
from diffusion_lab.inference.checkpoints import load_module
from diffusion_lab.inference.generate import load_pixel_model
from diffusion_lab.metrics.digits import DIGIT_NAMES, score_digit_samples
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file (python experiments/<study>/<script>.py): the repo root, for experiments.lib
from experiments.lib.outputs import add_out_argument, run_dir  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pipeline", help="exported DDPMPipeline folder")
    src.add_argument("--ckpt", help="or a training checkpoint (EMA weights)")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--sampler", default=None, help="a conf/sampler option (ddim, dpmpp, euler, flow_euler, ...); default: the one the model was trained with")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    add_out_argument(p, "ddpm_digits", "experiments/ddpm_digits")
    args = p.parse_args()

    sampler = load_sampler(args.sampler) if args.sampler else None
    module = load_module(args.ckpt, use_ema=True) if args.ckpt else None
    model = load_pixel_model(args.pipeline, module=module, sampler=sampler, local_files_only=True)
    t0 = time.perf_counter()
    images = model.generate(args.num_images, args.batch_size, args.steps, args.seed, "cpu")
    seconds = time.perf_counter() - t0
    scores = score_digit_samples(images)
    scores.update({"source": args.pipeline or args.ckpt, "sampler": args.sampler or model.scheduler_name, "steps": args.steps, "seed": args.seed, "sampling_seconds": round(seconds, 1)})

    out = run_dir(args.out, "ddpm_digits")
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
    print(f"\nwrote results.json, results.md and samples.png to {out}")


if __name__ == "__main__":
    main()
