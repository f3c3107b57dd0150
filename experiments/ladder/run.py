"""Reference-run ladder, CPU tier: experiment=ladder_digits_<process> for vp, flow_matching and edm,
trained (one thread each) and scored; the bands in the configs come from these numbers.

    .venv/bin/python experiments/ladder/run.py train --parallel 3            # 3 processes x seeds 42, 7
    .venv/bin/python experiments/ladder/run.py score                         # 500 samples each
    .venv/bin/python experiments/ladder/run.py score --out experiments/ladder   # refresh the committed results

Each run is the config as committed (700 steps of batch 32, EMA); scoring draws the config's
``ladder`` block (500 samples, DPM-Solver++ 20 steps, seed 0) from the checkpoint's EMA weights and
reports FID in digit features against all 1,797 real digits and the classifier's confidence.
Writes results.json, results.md, samples.png (one row per run) to a new
outputs/experiments/ladder/<date>_<time>/ (or --out; --out experiments/ladder refreshes the committed copy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a file (python experiments/<study>/<script>.py): the repo root, for experiments.lib
PROCESSES = ("vp", "flow_matching", "edm")
SEEDS = (42, 7)


def runs_of(args) -> dict[str, list[str]]:
    return {f"{p}_seed{s}": [f"experiment=ladder_digits_{p}", f"seed={s}"] for p in args.only or PROCESSES for s in args.seeds}


def train(args) -> None:
    from experiments.lib.cpu_jobs import train_jobs

    train_jobs(runs_of(args), Path(args.runs), args.parallel, quiet=True, cwd=str(ROOT))


def score(args) -> None:
    from omegaconf import OmegaConf

    from diffusion_lab.data.transforms import image_grid
    from diffusion_lab.diffusion.sampling import load_sampler
    from diffusion_lab.inference.checkpoints import load_module
    from diffusion_lab.metrics.digit_quality import digit_quality
    from diffusion_lab.metrics.features import DigitFeatures
    from experiments.lib.outputs import run_dir

    torch.set_num_threads(1)
    extractor, rows, grids = DigitFeatures(), [], []
    for name, overrides in runs_of(args).items():
        run = Path(args.runs) / name
        cfg = OmegaConf.load(run / "config.yaml")
        module = load_module(str(run / "checkpoints" / "last.ckpt"), use_ema=True)
        lad = cfg.ladder
        found, images = digit_quality(module, lad.num_images, lad.num_inference_steps, load_sampler(lad.sampler), lad.seed, extractor=extractor)
        cpu = json.loads((run / "train_cpu.json").read_text()) if (run / "train_cpu.json").exists() else {}
        rows.append({"run": name, "process": name.rsplit("_seed", 1)[0], "seed": cfg.seed, "steps": cfg.trainer.max_steps,
                     "batch_size": cfg.data.batch_size, **cpu, **found})
        grids.append(images[:20])
        print(rows[-1], flush=True)
    out = run_dir(args.out, "ladder")
    (out / "results.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    table = ["| run | process | seed | steps x batch | train CPU min | FID (digit features) | confidence | per digit (min-max of 500) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cpu_min = f"{r['cpu_seconds'] / 60:.1f}" if "cpu_seconds" in r else "-"
        hist = r["class_histogram"]
        table.append(f"| {r['run']} | {r['process']} | {r['seed']} | {r['steps']} x {r['batch_size']} | {cpu_min} | {r['fid']:.2f} | {r['confidence']:.3f} | {min(hist)}-{max(hist)} |")
    (out / "results.md").write_text("\n".join(table) + "\n")
    image_grid(torch.cat(grids), rows=len(grids)).save(out / "samples.png")
    print("\n".join(table))


def main() -> None:
    from experiments.lib.outputs import add_out_argument

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["train", "score"])
    p.add_argument("--runs", default=str(ROOT / "outputs" / "ladder"), help="where the training runs go / are read from")
    add_out_argument(p, "ladder", "experiments/ladder")
    p.add_argument("--only", nargs="*", choices=PROCESSES)
    p.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    p.add_argument("--parallel", type=int, default=3)
    args = p.parse_args()
    train(args) if args.stage == "train" else score(args)


if __name__ == "__main__":
    main()
