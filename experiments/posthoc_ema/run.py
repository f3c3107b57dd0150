"""Post-hoc EMA on digits: one training run, the EMA length chosen afterwards (Karras et al. 2024).

    .venv/bin/python experiments/posthoc_ema/run.py train                  # the demo recipe, 500 steps, snapshots every 25
    .venv/bin/python experiments/posthoc_ema/run.py score                  # FID vs sigma_rel -> outputs/experiments/posthoc_ema/<date>/
    .venv/bin/python experiments/posthoc_ema/run.py score --out experiments/posthoc_ema   # refresh the committed results

``train`` runs ``experiment=ddpm_digits`` (flow matching, the demo's UNet and optimiser) for
``--max-steps`` on one thread with ``callbacks.posthoc_ema.every_n_steps`` set; its regular EMA
(``callbacks.ema``, decay 0.9999 with warmup) is exported as usual. ``score`` reconstructs the
EMA of each ``--sigma-rels`` width from the snapshots (``callbacks/posthoc_ema.reconstruct``, no
retraining), draws 500 samples with DPM-Solver++ (20 steps, one fixed x_T) and scores FID / KID
in the digit classifier's feature space against all 1,797 real digits, beside the raw weights
and the run's regular EMA. Writes results.json, results.md, fid_vs_sigma_rel.png, samples.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a file (python experiments/<study>/<script>.py): the repo root, for experiments.lib
SIGMA_RELS = (0.02, 0.03, 0.05, 0.08, 0.12, 0.18, 0.25)


def train(args) -> None:
    run = Path(args.run)
    cmd = [sys.executable, "-m", "diffusion_lab.train", "experiment=ddpm_digits", "logger=csv", "trainer.max_time=null",
           f"trainer.max_steps={args.max_steps}", f"callbacks.posthoc_ema.every_n_steps={args.every}", "callbacks.progress_bar=null",
           f"hydra.run.dir={run}"]
    print("$ OMP_NUM_THREADS=1", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), check=True)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    info = {"wall_seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "max_steps": args.max_steps, "every_n_steps": args.every, "threads": 1}
    (run / "train_seconds.json").write_text(json.dumps(info))
    print(json.dumps(info))


def score(args) -> None:
    from diffusion_lab.callbacks.posthoc_ema import (
        find_snapshots,
        load_weights,
        reconstruct,
    )
    from diffusion_lab.inference.checkpoints import load_module
    from diffusion_lab.metrics.digits import real_digits, score_digit_samples
    from diffusion_lab.metrics.features import DigitFeatures
    from experiments.lib.samplers import compare_samplers

    torch.set_num_threads(1)
    run = Path(args.run)
    ckpt = run / "checkpoints" / "last.ckpt"
    snapshots = find_snapshots(run / "ema_snapshots")
    extractor = DigitFeatures()
    rows, grids = [], []
    real_features = None
    variants = [("raw weights", None), ("regular EMA (callbacks.ema)", None)] + [(f"post-hoc {s}", s) for s in args.sigma_rels]
    for label, sigma_rel in variants:
        module = load_module(str(ckpt), use_ema=label.startswith("regular"))
        report = {}
        if sigma_rel is not None:
            weights, report = reconstruct(snapshots, sigma_rel)
            load_weights(module, weights)
        unet = module.base_backbone.eval()
        if real_features is None:
            reference, _ = real_digits("all", unet.config.sample_size)
            real_features, _ = extractor.extract(reference, desc="reference features")
        found, images = compare_samplers(unet, module.sampling_scheduler(), real_features, extractor, [(args.sampler, args.steps)], args.num_images, 250, args.seed)
        x = images[f"{args.sampler}-{args.steps}"]
        digits = score_digit_samples(x, classifier=extractor.classifier, reference=False)
        rows.append({"weights": label, "sigma_rel": sigma_rel, "residual": report.get("residual"), "snapshots_used": len(report.get("snapshots", [])),
                     **found[0], "digit_confidence": digits["confidence"], "class_histogram": digits["class_histogram"]})
        grids.append(x[:20])
        print(f"{label}: FID {found[0]['fid']:.2f}", flush=True)
    info = json.loads((run / "train_seconds.json").read_text()) if (run / "train_seconds.json").exists() else {}
    write(rows, grids, Path(args.out) if args.out else None, args, info, len(snapshots))


def write(rows: list[dict], grids: list[torch.Tensor], out: Path | None, args, info: dict, n_snapshots: int) -> None:
    from diffusion_lab.data.transforms import image_grid
    from experiments.lib.outputs import run_dir

    out = run_dir(out, "posthoc_ema")
    (out / "results.json").write_text(json.dumps({"num_images": args.num_images, "seed": args.seed, "sampler": args.sampler, "steps": args.steps,
                                                   "train": info, "snapshot_files": n_snapshots, "rows": rows}, indent=2) + "\n")
    table = [
        (f"{args.num_images} samples per row ({args.sampler}, {args.steps} steps, same x_T, seed {args.seed}) vs 1,797 real digits, digit-classifier features; "
         f"one run of {info.get('max_steps', '?')} steps, {n_snapshots} snapshot files"),
        "",
        "| weights | sigma_rel | profile fit residual | FID | KID x1e3 | confidence | per digit (min-max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sr = f"{r['sigma_rel']:.3f}" if r["sigma_rel"] is not None else "-"
        res = f"{r['residual']:.4f}" if r["residual"] is not None else "-"
        h = r["class_histogram"]
        table.append(f"| {r['weights']} | {sr} | {res} | {r['fid']:.2f} | {r['kid_mean']:.1f} | {r['digit_confidence']:.3f} | {min(h)}-{max(h)} |")
    (out / "results.md").write_text("\n".join(table) + "\n")
    plot(rows, out / "fid_vs_sigma_rel.png")
    image_grid(torch.cat(grids), rows=len(grids)).save(out / "samples.png")  # one row per weights
    print("\n".join(table))
    print(f"\nwrote {out}/results.json, results.md, fid_vs_sigma_rel.png, samples.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    post = [r for r in rows if r["sigma_rel"] is not None]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot([r["sigma_rel"] for r in post], [r["fid"] for r in post], "o-", label="post-hoc EMA (one run, reconstructed)")
    styles = {"raw weights": ("tab:red", ":"), "regular EMA (callbacks.ema)": ("tab:green", "--")}
    for r in rows:
        if r["weights"] in styles:
            color, ls = styles[r["weights"]]
            ax.axhline(r["fid"], color=color, ls=ls, label=f"{r['weights']}: {r['fid']:.1f}")
    ax.set_xscale("log")
    ax.set_xlabel("sigma_rel (EMA width / training length)")
    ax.set_ylabel("FID (digit features)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("digits demo recipe: FID vs post-hoc EMA length", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["train", "score"])
    p.add_argument("--run", default=str(ROOT / "outputs" / "posthoc_ema" / "digits"), help="the training run dir")
    p.add_argument("--out", default=None, help="where the table and plots go (default: a new outputs/experiments/posthoc_ema/<date>_<time>/)")
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--every", type=int, default=25, help="callbacks.posthoc_ema.every_n_steps")
    p.add_argument("--sigma-rels", type=float, nargs="+", default=list(SIGMA_RELS))
    p.add_argument("--sampler", default="dpmpp")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    train(args) if args.stage == "train" else score(args)


if __name__ == "__main__":
    main()
