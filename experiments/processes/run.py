"""Processes compared on digits: vp-epsilon, vp-v, flow matching (logit-normal), EDM.

    .venv/bin/python experiments/processes/run.py train --parallel 2   # 4 runs of the demo recipe, two at a time
    .venv/bin/python experiments/processes/run.py score            # 500 samples x sampler x {10, 20, 50} steps per run
    .venv/bin/python experiments/processes/run.py score --out experiments/processes   # refresh the committed results

Each run is `experiment=ddpm_digits` (same UNet, optimiser, batch, 2,500 steps, EMA) with only the
process changed, trained on the same machine (``--parallel 2``: two at a time, one thread each);
each run's train wall time is recorded.
Scoring draws 500 samples per (sampler, steps) from one fixed x_T with the exported pipeline's
EMA weights, and scores them against all 1,797 real digits with FID / KID in the digit
classifier's feature space plus the classifier's confidence and class balance. Writes
results.json, results.md (the table), quality.png (FID and confidence vs steps and vs wall time)
and samples.png to a new outputs/experiments/processes/<date>_<time>/ (or --out; never the committed
copy by accident: --out experiments/processes refreshes it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a file (python experiments/<study>/<script>.py): the repo root, for experiments.lib
# name -> (train overrides, samplers to score: each process's own fast samplers)
VARIANTS: dict[str, tuple[list[str], list[str]]] = {
    "vp_epsilon": ([], ["ddim", "dpmpp"]),
    "vp_v": (["process.prediction_type=v_prediction"], ["ddim", "dpmpp"]),
    "flow_matching": (["process=flow_matching"], ["flow_euler", "dpmpp"]),
    "edm": (["process=edm"], ["edm_euler", "dpmpp"]),
}
STEPS = (10, 20, 50)


def train(args) -> None:
    """Train the variants, ``--parallel`` at a time (each then on one thread: small CPU models use
    one core far better than two), and record each run's wall time."""
    runs = Path(args.runs)
    pending = list(args.only or VARIANTS)
    env = dict(os.environ, OMP_NUM_THREADS="1") if args.parallel > 1 else dict(os.environ)
    running: list[tuple[str, subprocess.Popen, float]] = []
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            overrides, _ = VARIANTS[name]
            cmd = [sys.executable, "-m", "diffusion_lab.train", "experiment=ddpm_digits", *overrides, "logger=csv",
                   "trainer.max_time=null", f"trainer.max_steps={args.max_steps}", f"hydra.run.dir={runs / name}"]
            print("$", " ".join(cmd[1:]), flush=True)
            out = subprocess.DEVNULL if args.quiet else None
            running.append((name, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out), time.perf_counter()))
        time.sleep(2)
        for item in list(running):
            name, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode:
                raise SystemExit(f"{name}: training failed (exit {proc.returncode}); see {runs / name}/train.log")
            seconds = time.perf_counter() - t0
            info = {"seconds": round(seconds, 1), "max_steps": args.max_steps, "threads": env.get("OMP_NUM_THREADS", "default"), "parallel": args.parallel}
            (runs / name / "train_seconds.json").write_text(json.dumps(info))
            print(f"{name}: {seconds / 60:.1f} min", flush=True)


def score(args) -> None:
    from diffusers import DDPMPipeline

    from diffusion_lab.metrics.digits import real_digits, score_digit_samples
    from diffusion_lab.metrics.features import DigitFeatures
    from experiments.lib.samplers import compare_samplers

    extractor = DigitFeatures()
    rows, grids = [], []
    for name in args.only or VARIANTS:
        _, samplers = VARIANTS[name]
        run_dir = Path(args.runs) / name
        pipe = DDPMPipeline.from_pretrained(run_dir / "pipeline")
        unet = pipe.unet.eval()
        reference, _ = real_digits("all", unet.config.sample_size)
        real_features, _ = extractor.extract(reference, desc="reference features")
        settings = [(s, n) for s in samplers for n in STEPS]
        found, images = compare_samplers(unet, pipe.scheduler, real_features, extractor, settings, args.num_images, 250, args.seed)
        train_seconds = json.loads((run_dir / "train_seconds.json").read_text())["seconds"] if (run_dir / "train_seconds.json").exists() else None
        for r in found:
            digits = score_digit_samples(images[f"{r['sampler']}-{r['steps']}"], classifier=extractor.classifier, reference=False)
            hist = digits["class_histogram"]
            rows.append({"process": name, **r, "train_seconds": train_seconds, "digit_confidence": digits["confidence"],
                         "class_histogram": hist, "class_min": min(hist), "class_max": max(hist)})
        best = min((r for r in rows if r["process"] == name), key=lambda r: r["fid"])
        grids.append(images[f"{best['sampler']}-{best['steps']}"][:20])
    from experiments.lib.outputs import run_dir

    write(rows, grids, run_dir(args.out, "processes"), args)


def write(rows: list[dict], grids: list[torch.Tensor], out: Path, args) -> None:
    from diffusion_lab.data.transforms import image_grid

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"num_images": args.num_images, "seed": args.seed, "rows": rows}, indent=2) + "\n")
    table = [
        f"{args.num_images} samples per setting (same x_T, seed {args.seed}) vs 1,797 real digits, digit-classifier features",
        "",
        "| process | sampler | steps | NFE | s / image | FID | KID | confidence | per digit (min-max of 500) | train min |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        train_min = f"{r['train_seconds'] / 60:.1f}" if r["train_seconds"] else "-"
        table.append(
            f"| {r['process']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {r['seconds_per_image']:.4f} | {r['fid']:.2f} | "
            f"{r['kid_mean']:.1f} | {r['digit_confidence']:.3f} | {r['class_min']}-{r['class_max']} | {train_min} |"
        )
    (out / "results.md").write_text("\n".join(table) + "\n")
    plot(rows, out / "quality.png")
    image_grid(torch.cat(grids), rows=len(grids)).save(out / "samples.png")  # one row per process, its best setting
    print("\n".join(table))
    print(f"\nwrote {out}/results.json, results.md, quality.png, samples.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for (process, sampler) in dict.fromkeys((r["process"], r["sampler"]) for r in rows):
        sel = [r for r in rows if r["process"] == process and r["sampler"] == sampler]
        label = f"{process} / {sampler}"
        axes[0].plot([r["steps"] for r in sel], [r["fid"] for r in sel], "o-", label=label)
        axes[1].plot([r["seconds_per_image"] for r in sel], [r["fid"] for r in sel], "o-", label=label)
        axes[2].plot([r["steps"] for r in sel], [r["digit_confidence"] for r in sel], "o-", label=label)
    for ax, xl, yl in ((axes[0], "sampler steps", "FID (digit features)"), (axes[1], "wall time per image (s)", "FID (digit features)"),
                       (axes[2], "sampler steps", "classifier confidence")):
        ax.set_xscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[2].axhline(0.995, color="grey", ls="--", lw=1, label="held-out real digits")
    axes[2].legend(fontsize=7)
    fig.suptitle("digits, demo recipe with equal training steps, one process per run (experiments/processes/README.md)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    from experiments.lib.outputs import add_out_argument

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["train", "score"])
    p.add_argument("--runs", default=str(ROOT / "outputs" / "processes"), help="where the training runs go / are read from")
    add_out_argument(p, "processes", "experiments/processes")
    p.add_argument("--only", nargs="*", choices=list(VARIANTS), help="a subset of the variants")
    p.add_argument("--max-steps", type=int, default=2500)
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel", type=int, default=1, help="train this many variants at once (one thread each)")
    p.add_argument("--quiet", action="store_true", help="training output off (progress bars)")
    args = p.parse_args()
    train(args) if args.stage == "train" else score(args)


if __name__ == "__main__":
    main()
