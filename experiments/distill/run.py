"""Distillation study: the distilled student at 1 / 2 / 4 steps against its teacher (the demo) at 20.

    OMP_NUM_THREADS=1 python -m diffusion_lab.train experiment=distill_digits model.pretrained=<demo run>/pipeline
    .venv/bin/python experiments/distill/run.py --teacher <demo run>/pipeline --student <distill run>/pipeline --out experiments/distill

Every setting draws --num-images samples from one fixed noise tensor and is scored against all 1,797
real digits: FID in the digit classifier's features and the classifier's mean confidence (as
diffusion_lab.metrics.digit_quality scores the ladder), plus wall-clock seconds per image. The teacher
samples with its exported sampler (DPM-Solver++) and, for reference, with the student's (sampler=lcm);
the student with its exported one (sampler=lcm). Writes results.json, results.md (the table) and
samples.png (one row per setting, the same noise) into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from diffusion_lab.data.transforms import image_grid
from diffusion_lab.diffusion.sampling import load_sampler
from diffusion_lab.inference.generate import load_pixel_model
from diffusion_lab.metrics.digits import real_digits, score_digit_samples
from diffusion_lab.metrics.distribution import fid
from diffusion_lab.metrics.features import DigitFeatures

# (model, sampler: None = the one exported with the pipeline, steps)
SETTINGS = [
    ("teacher", None, 20), ("teacher", None, 4), ("teacher", None, 2), ("teacher", None, 1),
    ("teacher", "lcm", 4), ("teacher", "lcm", 2), ("teacher", "lcm", 1),
    ("student", None, 4), ("student", None, 2), ("student", None, 1),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="the demo's <run>/pipeline")
    ap.add_argument("--student", required=True, help="the distilled <run>/pipeline")
    ap.add_argument("--num-images", type=int, default=500)
    ap.add_argument("--out", default="experiments/distill")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    extractor = DigitFeatures()
    real, _ = real_digits("all", 8)
    real_features, _ = extractor.extract(real, desc="real digit features")
    noise = torch.randn(args.num_images, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    rows, grids = [], []
    for who, sampler, steps in SETTINGS:
        model = load_pixel_model(getattr(args, who), sampler=load_sampler(sampler) if sampler else None, local_files_only=True)
        model.generate(2, 2, steps, progress=False)  # warm-up: first-call costs are not sampling speed
        t0 = time.perf_counter()
        images = model.generate(args.num_images, 250, steps, noise=noise, progress=False)
        seconds = time.perf_counter() - t0
        fake_features, _ = extractor.extract(images, desc=f"{who} {steps}")
        scores = score_digit_samples(images, classifier=extractor.classifier, reference=False)
        row = {
            "model": who, "sampler": model.scheduler_name + (" (order 1)" if "DPMSolver" in model.scheduler_name and model.make_scheduler().config.solver_order == 1 else ""),
            "steps": steps, "fid": fid(real_features, fake_features), "confidence": scores["confidence"],
            "seconds_per_image": seconds / args.num_images, "class_histogram": scores["class_histogram"],
        }
        rows.append(row)
        grids.append(images[:16])
        print(f"{who:8s} {row['sampler']:36s} {steps:3d} steps  FID {row['fid']:7.2f}  confidence {row['confidence']:.3f}  {1e3 * row['seconds_per_image']:.2f} ms/image")
    base = next(r for r in rows if r["model"] == "teacher" and r["steps"] == 20)["seconds_per_image"]
    for r in rows:
        r["speedup_vs_teacher_20"] = base / r["seconds_per_image"]
    meta = {"teacher": args.teacher, "student": args.student, "num_images": args.num_images, "machine": platform.processor() or platform.machine(), "threads": 1}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["| model | sampler | steps | FID (digit features) | confidence | ms / image | speed-up vs teacher 20 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['fid']:.2f} | {r['confidence']:.3f} | {1e3 * r['seconds_per_image']:.2f} | {r['speedup_vs_teacher_20']:.1f}x |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    image_grid(torch.cat(grids), rows=len(grids), upscale_to=32).save(out / "samples.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
