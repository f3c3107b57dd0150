"""Distillation study on the digits text-to-image stack: the LCM student at 1 / 2 / 4 steps against its teacher
(experiment=ldm_digits's pipeline, DPM-Solver++, guidance 3) at 20, 4, 2 and 1 steps.

    OMP_NUM_THREADS=1 python -m diffusion_lab.train experiment=distill_ldm_digits hydra.run.dir=outputs/distill_ldm_digits/run
    OMP_NUM_THREADS=1 .venv/bin/python experiments/distill/t2i.py --teacher outputs/ldm_digits/pipeline \
        --student outputs/distill_ldm_digits/run/pipeline --out experiments/distill/t2i

Every setting draws ``--per-class`` samples of each prompt "a handwritten digit k" from one seed and is
scored as ``experiments/reward/t2i_score.py`` scores (its functions): prompt accuracy, the probability of
the prompted digit, predicted-digit counts, FID in the digit classifier's features against all 1,797 real
digits, and wall-clock ms per image after a warm-up (one thread). The teacher samples with its exported
scheduler (DPM-Solver++) at guidance 3, as the stack is scored; the student with its exported one
(LCMScheduler) at guidance 1 (the teacher's guidance is distilled into it), plus one row at guidance 7.5,
``diffusion_lab.sample``'s default when ``guidance_scale=`` is not given. Writes results.json, results.md,
samples.png (one row per setting: the first sample of each digit) and ``samples_<model>_<steps>.png``
(10 per digit) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reward"))
from t2i_score import grid, load_t2i, real_reference, score_samples, timed_samples  # noqa: E402

from diffusion_lab.data.transforms import image_grid  # noqa: E402
from diffusion_lab.metrics.features import DigitFeatures  # noqa: E402

# (model, steps, guidance); each samples with the scheduler exported with its pipeline
SETTINGS = [
    ("teacher", 20, 3.0), ("teacher", 4, 3.0), ("teacher", 2, 3.0), ("teacher", 1, 3.0),
    ("student", 4, 1.0), ("student", 2, 1.0), ("student", 1, 1.0), ("student", 2, 7.5),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="outputs/ldm_digits/pipeline", help="experiment=ldm_digits's pipeline")
    ap.add_argument("--student", required=True, help="experiment=distill_ldm_digits's <run>/pipeline")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--out", default="experiments/distill/t2i")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    extractor = DigitFeatures()
    real_features = real_reference(extractor)
    pipes = {who: load_t2i(getattr(args, who)) for who in ("teacher", "student")}
    rows, firsts = [], []
    for who, steps, guidance in SETTINGS:
        images, seconds = timed_samples(pipes[who], args.per_class, steps, guidance)
        row = {"model": who, "sampler": type(pipes[who].scheduler).__name__, "steps": steps, "guidance": guidance,
               **score_samples(images, args.per_class, extractor, real_features), "ms_per_image": 1e3 * seconds}
        rows.append(row)
        firsts.append(images[:: args.per_class])
        grid(images, args.per_class).save(out / f"samples_{who}_{steps}{'' if guidance in (1.0, 3.0) else f'_g{guidance:g}'}.png")
        print(f"{who:8s} {row['sampler']:28s} {steps:3d} steps g{guidance:g}  acc {row['accuracy']:.3f}  FID {row['fid']:7.2f}  {row['ms_per_image']:.2f} ms/image", flush=True)
    base = next(r for r in rows if r["model"] == "teacher" and r["steps"] == 20)["ms_per_image"]
    for r in rows:
        r["speedup_vs_teacher_20"] = base / r["ms_per_image"]
    meta = {"teacher": args.teacher, "student": args.student, "per_class": args.per_class, "machine": platform.processor() or platform.machine(), "threads": 1}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    n = 10 * args.per_class
    lines = [f"| model | sampler | steps | guidance | prompt accuracy | p(prompted digit) | FID (digit features) | min / max predicted per digit of {n} | ms / image | speed-up vs teacher 20 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['guidance']:g} | {r['accuracy']:.3f} | {r['reward']:.3f} | {r['fid']:.2f} | "
                     f"{r['min_class']} / {r['max_class']} | {r['ms_per_image']:.2f} | {r['speedup_vs_teacher_20']:.1f}x |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    image_grid(torch.cat(firsts), rows=len(firsts), upscale_to=32).save(out / "samples.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
