"""Score digits pipelines before / after DPO: classifier confidence, class balance, FID.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/reward/dpo_score.py \
        demo=outputs/ddpm_digits/runs/<date>/pipeline beta500=outputs/dpo_digits/beta500/pipeline \
        --out experiments/reward/results/dpo   # without --out: a new outputs/experiments/reward_dpo/<date>_<time>/

For each ``label=pipeline``: ``--num-images`` unconditional samples (the pipeline's own sampler,
``--steps``, one seed: the same starting noise for every pipeline), scored by the digit classifier
trained on real digits (``diffusion_lab.metrics.digits``): mean max-class confidence, how many
samples fall in each class, and FID in the classifier's features against all 1,797 real digits
(``metrics/distribution.fid``, as ``metrics/digit_quality.py`` scores modules). Writes results.json,
results.md and ``samples_<label>.png`` (the first 100) into ``--out`` (default: a new run folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from diffusion_lab.data.transforms import image_grid
from diffusion_lab.inference.generate import load_pixel_model
from diffusion_lab.metrics.digits import DIGIT_NAMES, real_digits, score_digit_samples
from diffusion_lab.metrics.distribution import fid
from diffusion_lab.metrics.features import DigitFeatures
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file (python experiments/<study>/<script>.py): the repo root, for experiments.lib
from experiments.lib.outputs import add_out_argument, run_dir  # noqa: E402


def score_pipeline(pipeline: str, extractor: DigitFeatures, real_features, num_images: int, steps: int, seed: int) -> tuple[dict, object]:
    model = load_pixel_model(pipeline, local_files_only=True)
    t0 = time.perf_counter()
    images = model.generate(num_images, 250, steps, seed, "cpu", progress=False)
    seconds = time.perf_counter() - t0
    scores = score_digit_samples(images, classifier=extractor.classifier, reference=False)
    features, _ = extractor.extract(images, desc="sample features")
    hist = scores["class_histogram"]
    out = {"pipeline": pipeline, "confidence": scores["confidence"], "fid": fid(real_features, features), "class_histogram": hist,
           "min_class": min(hist), "max_class": max(hist), "sampler": model.scheduler_name, "steps": steps, "seed": seed, "sampling_seconds": round(seconds, 1)}
    return out, images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipelines", nargs="+", help="label=<pipeline folder>")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    add_out_argument(p, "reward_dpo", "experiments/reward/results/dpo")
    args = p.parse_args()

    out = run_dir(args.out, "reward_dpo")
    extractor = DigitFeatures()
    real, _ = real_digits("all", 8)
    real_features, _ = extractor.extract(real, desc="real digit features")
    results = {}
    for entry in args.pipelines:
        label, path = entry.split("=", 1)
        results[label], images = score_pipeline(path, extractor, real_features, args.num_images, args.steps, args.seed)
        image_grid(images[:100], rows=10).save(out / f"samples_{label}.png")
        print(label, json.dumps(results[label]))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    rows = ["| model | confidence | FID (classifier features) | min / max per digit of " + str(args.num_images) + " | " + " | ".join(DIGIT_NAMES) + " |",
            "|---|---|---|---|" + "---|" * 10]
    for label, r in results.items():
        rows.append(f"| {label} | {r['confidence']:.3f} | {r['fid']:.2f} | {r['min_class']} / {r['max_class']} | " + " | ".join(str(c) for c in r["class_histogram"]) + " |")
    (out / "results.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
