"""GRPO on the demo's digits model with the digit classifier's reward, at two KL weights.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/reward/grpo_study.py train --demo <demo run>/pipeline
    OMP_NUM_THREADS=1 .venv/bin/python experiments/reward/grpo_study.py score --demo <demo run>/pipeline \
        --out experiments/reward/results/grpo

``train``: ``experiment=grpo_digits`` (reward = the classifier's confidence in its most likely digit)
from the demo's exported pipeline, once per variant below (one after the other, one thread each;
each run bounded by its step count and by ``trainer.max_time``), into outputs/grpo_digits/<variant>/.
``score``: the demo and each run's exported pipeline, 500 samples each from the same seed with the
pipeline's own sampler (DPM-Solver++, 20 steps), scored by ``dpo_score.score_pipeline`` (classifier
confidence, class counts, FID in the classifier's features against all 1,797 real digits), plus the
reward curve of each run from its CSV log. Writes results.json, results.md and
``samples_<label>.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
# variant -> train overrides (on top of experiment=grpo_digits)
VARIANTS: dict[str, list[str]] = {
    "kl0": ["method.kl_weight=0.0"],
    "kl0.1": ["method.kl_weight=0.1"],
    "kl0.3": ["method.kl_weight=0.3"],
    "kl1": ["method.kl_weight=1.0"],
}
COMMON = ["logger=csv", "trainer.log_every_n_steps=1", "callbacks.progress_bar=null"]


def run_dir(variant: str) -> Path:
    return ROOT / "outputs" / "grpo_digits" / variant


def train(demo: str, variants: list[str], extra: list[str]) -> None:
    for name in variants:
        out = run_dir(name)
        cmd = [sys.executable, "-m", "diffusion_lab.train", "experiment=grpo_digits", f"model.pretrained={demo}", *COMMON, *VARIANTS[name], *extra, f"hydra.run.dir={out}"]
        print(" ".join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        (out / "wall_seconds.txt").write_text(f"{time.perf_counter() - t0:.0f}\n")


def reward_curve(run: Path, window: int = 10) -> dict:
    """train/reward_mean (on the stochastic sampler's samples) at the start and the end: means of the first / last ``window`` steps."""
    rows = [r for f in run.glob("csv/**/metrics.csv") for r in csv.DictReader(open(f)) if r.get("train/reward_mean")]
    values = [float(r["train/reward_mean"]) for r in sorted(rows, key=lambda r: int(r["step"]))]
    kls = [float(r["train/kl"]) for r in rows if r.get("train/kl")]
    if not values:
        return {}
    return {"train_steps": len(values), "sde_reward_first": sum(values[:window]) / len(values[:window]), "sde_reward_last": sum(values[-window:]) / len(values[-window:]),
            "kl_last": sum(kls[-window:]) / max(1, len(kls[-window:]))}


def score(demo: str, variants: list[str], out: Path, num_images: int, steps: int, seed: int) -> None:
    from dpo_score import score_pipeline

    from diffusion_lab.data.transforms import image_grid
    from diffusion_lab.metrics.digits import DIGIT_NAMES, real_digits
    from diffusion_lab.metrics.features import DigitFeatures

    out.mkdir(parents=True, exist_ok=True)
    extractor = DigitFeatures()
    real, _ = real_digits("all", 8)
    real_features, _ = extractor.extract(real, desc="real digit features")
    results = {}
    for label, path in [("demo", demo)] + [(f"grpo_{v}", str(run_dir(v) / "pipeline")) for v in variants]:
        results[label], images = score_pipeline(path, extractor, real_features, num_images, steps, seed)
        if label != "demo":
            run = run_dir(label.removeprefix("grpo_"))
            results[label].update(reward_curve(run), overrides=VARIANTS[label.removeprefix("grpo_")])
            wall = run / "wall_seconds.txt"
            results[label]["train_wall_seconds"] = int(wall.read_text()) if wall.is_file() else None
        image_grid(images[:100], rows=10).save(out / f"samples_{label}.png")
        print(label, json.dumps(results[label]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    rows = [f"| model | confidence | FID | min / max per digit of {num_images} | " + " | ".join(DIGIT_NAMES) + " | SDE reward first -> last 10 steps | KL (last 10) |",
            "|---|---|---|---|" + "---|" * 10 + "---|---|"]
    for label, r in results.items():
        curve = f"{r['sde_reward_first']:.3f} -> {r['sde_reward_last']:.3f}" if "sde_reward_first" in r else "-"
        kl = f"{r['kl_last']:.3f}" if "kl_last" in r else "-"
        rows.append(f"| {label} | {r['confidence']:.3f} | {r['fid']:.2f} | {r['min_class']} / {r['max_class']} | " + " | ".join(str(c) for c in r["class_histogram"]) + f" | {curve} | {kl} |")
    (out / "results.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["train", "score"])
    p.add_argument("--demo", required=True, help="the demo's exported pipeline (<run>/pipeline)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=str(ROOT / "outputs" / "experiments" / "reward" / time.strftime("grpo_%Y-%m-%d_%H-%M-%S")))
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="extra train overrides (key=value), for every variant")
    args = p.parse_args()
    if args.stage == "train":
        train(args.demo, args.variants, args.overrides)
    else:
        score(args.demo, args.variants, Path(args.out), args.num_images, args.steps, args.seed)


if __name__ == "__main__":
    main()
