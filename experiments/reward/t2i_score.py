"""Score digits text-to-image pipelines (experiment=ldm_digits and its second stages) by the digit classifier.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/reward/t2i_score.py \
        base=outputs/ldm_digits/pipeline grpo=outputs/grpo_ldm_digits/kl1/pipeline dpo=outputs/dpo_ldm_digits/beta5000/pipeline \
        --out experiments/reward/results/t2i     # without --out: a new outputs/experiments/reward_t2i/<date>_<time>/

For each ``label=pipeline``: ``--per-class`` samples of each prompt "a handwritten digit k" (the
pipeline's own sampler unless ``--sampler``, ``--steps``, guidance ``--guidance``, one seed: the same
starting noise for every pipeline), scored by the digit classifier trained on real digits
(``diffusion_lab.metrics.digits``): prompt accuracy (the predicted digit is the prompted one), the
reward (mean probability of the prompted digit, what ``reward=digit_classifier`` gives GRPO), the
predicted-digit counts over all samples (a collapse onto a few digits shows there), per-prompt
accuracy, and FID in the classifier's features against all 1,797 real digits
(``metrics/distribution.fid``). Writes results.json, results.md and ``samples_<label>.png`` (one row
per digit) into ``--out``. ``experiments/distill/t2i.py`` scores the distilled student with the same
functions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from diffusion_lab.data.transforms import image_grid
from diffusion_lab.diffusion.sampling import load_sampler
from diffusion_lab.inference.generate import generate_images
from diffusion_lab.metrics.digits import DIGIT_NAMES, class_scores, real_digits
from diffusion_lab.metrics.distribution import fid
from diffusion_lab.metrics.features import DigitFeatures
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file (python experiments/<study>/<script>.py): the repo root, for experiments.lib
from experiments.lib.outputs import add_out_argument, run_dir  # noqa: E402

TEMPLATE = "a handwritten digit {name}"


def load_t2i(pipeline: str, sampler: str | None = None):
    """The ``StableDiffusionPipeline`` folder, its scheduler swapped for ``sampler=`` (a conf/sampler option) if given."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    if sampler:
        pipe.scheduler = load_sampler(sampler).scheduler(pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_digits(pipe, per_class: int, steps: int, guidance: float, seed: int = 0, batch_size: int = 250) -> torch.Tensor:
    """``[10 * per_class, 3, H, W]`` in [-1, 1]: digit k's prompt at rows ``k * per_class ...``."""
    prompts = [TEMPLATE.format(name=name) for name in DIGIT_NAMES for _ in range(per_class)]
    return generate_images(pipe, len(prompts), batch_size, steps, seed, prompts=prompts, guidance_scale=guidance).images


def score_samples(images: torch.Tensor, per_class: int, extractor: DigitFeatures, real_features: torch.Tensor) -> dict:
    """Prompt accuracy, reward, per-prompt accuracy, predicted-digit counts and FID of ``sample_digits``' images."""
    labels = torch.arange(10).repeat_interleave(per_class)
    probs = extractor.classifier.predict_proba(images)
    scores = class_scores(probs, labels)
    pred = probs.argmax(-1)
    features, _ = extractor.extract(images, desc="sample features")
    hist = scores["class_histogram"]
    return {
        "accuracy": scores["accuracy"],
        "reward": float(probs.gather(1, labels[:, None]).mean()),
        "per_prompt_accuracy": [float((pred[labels == k] == k).float().mean()) for k in range(10)],
        "class_histogram": hist, "min_class": min(hist), "max_class": max(hist),
        "marginal_entropy": scores["marginal_entropy"],
        "fid": fid(real_features, features),
    }


def timed_samples(pipe, per_class: int, steps: int, guidance: float, seed: int = 0) -> tuple[torch.Tensor, float]:
    """(``sample_digits``' images, seconds per image), after a warm-up call (first-call costs are not sampling speed)."""
    sample_digits(pipe, 1, steps, guidance, seed)
    t0 = time.perf_counter()
    images = sample_digits(pipe, per_class, steps, guidance, seed)
    return images, (time.perf_counter() - t0) / len(images)


def real_reference(extractor: DigitFeatures, resolution: int = 16) -> torch.Tensor:
    """Classifier features ``[1797, 128]`` of all real digits at the stack's resolution."""
    real, _ = real_digits("all", resolution)
    return extractor.extract(real, desc="real digit features")[0]


def grid(images: torch.Tensor, per_class: int, cols: int = 10):
    """Rows = digits 0..9, ``cols`` samples each."""
    return image_grid(torch.cat([images[k * per_class : k * per_class + cols] for k in range(10)]), rows=10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipelines", nargs="+", help="label=<StableDiffusionPipeline folder>")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--sampler", default=None, help="a conf/sampler option (default: the scheduler saved with each pipeline)")
    p.add_argument("--seed", type=int, default=0)
    add_out_argument(p, "reward_t2i", "experiments/reward/results/t2i")
    args = p.parse_args()
    torch.set_num_threads(1)

    out = run_dir(args.out, "reward_t2i")
    extractor = DigitFeatures()
    real_features = real_reference(extractor)
    results = {}
    for entry in args.pipelines:
        label, path = entry.split("=", 1)
        pipe = load_t2i(path, args.sampler)
        images, seconds = timed_samples(pipe, args.per_class, args.steps, args.guidance, args.seed)
        results[label] = {"pipeline": path, "sampler": type(pipe.scheduler).__name__, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
                          **score_samples(images, args.per_class, extractor, real_features), "ms_per_image": 1e3 * seconds}
        grid(images, args.per_class).save(out / f"samples_{label}.png")
        print(label, json.dumps(results[label]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    n = 10 * args.per_class
    rows = [f"| model | prompt accuracy | reward (p of prompted digit) | FID (classifier features) | min / max predicted per digit of {n} | " + " | ".join(str(k) for k in range(10)) + " |",
            "|---|---|---|---|---|" + "---|" * 10]
    for label, r in results.items():
        rows.append(f"| {label} | {r['accuracy']:.3f} | {r['reward']:.3f} | {r['fid']:.2f} | {r['min_class']} / {r['max_class']} | " + " | ".join(str(c) for c in r["class_histogram"]) + " |")
    (out / "results.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
