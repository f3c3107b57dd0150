"""Table and plots of a prediction-type x beta-schedule sweep, built from what the runs logged.

    .venv/bin/python experiments/sweep_digits/report.py --sweep <sweep dir>
    .venv/bin/python experiments/sweep_digits/report.py --sweep <sweep dir> --out experiments/sweep_digits   # refresh the committed results

For every job folder of the sweep: its offline W&B run (name, config, val/loss history, images/s)
read with the repo's tests/wandb_offline.py, and its exported pipeline scored on N samples
(``--sampler``, default DDIM, fixed seed) with the digit classifier: Frechet distance of
classifier features to held-out real digits (FD, lower is better; the floor is half of the real
set against the other half; val/loss is not comparable across prediction types, each has its own
target) and the classifier's class-marginal entropy (log 10 = 2.303 when every digit appears
equally often). Writes results.json, results.md, curves.png and samples.png into a new
outputs/experiments/sweep_digits/<date>_<time>/ (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The offline W&B reader is test tooling (tests/wandb_offline.py), not part of the library: put the
# repo root on sys.path so the repo's `tests` package imports when this script is run as a file.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from diffusion_lab.data.transforms import image_grid  # noqa: E402
from diffusion_lab.diffusion.sampling import Sampler, load_sampler  # noqa: E402
from diffusion_lab.inference.generate import load_pixel_model  # noqa: E402
from diffusion_lab.metrics.digits import class_scores, real_digits  # noqa: E402
from diffusion_lab.metrics.distribution import fid  # noqa: E402
from diffusion_lab.metrics.features import DigitFeatures  # noqa: E402
from experiments.lib.outputs import add_out_argument, run_dir  # noqa: E402
from tests.wandb_offline import find_offline_runs  # noqa: E402


def score(pipeline: Path, sampler: Sampler, features: DigitFeatures, real_feats: torch.Tensor, n: int, steps: int, seed: int) -> tuple[dict, torch.Tensor]:
    model = load_pixel_model(str(pipeline), sampler=sampler, local_files_only=True)
    images = model.generate(n, 256, steps, seed, "cpu", progress=False)
    feats, logits = features.extract(images)
    scores = class_scores(logits.softmax(-1))
    return {"fd": fid(real_feats, feats), "marginal_entropy": scores["marginal_entropy"], "confidence": scores["confidence"]}, images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", required=True, help="the multirun folder (hydra.sweep.dir)")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--sampler", default="ddim", help="a conf/sampler option (ddim, dpmpp, ddpm, ...)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    add_out_argument(p, "sweep_digits", "experiments/sweep_digits")
    args = p.parse_args()
    torch.set_num_threads(1)

    runs = find_offline_runs(args.sweep)
    if not runs:
        raise SystemExit(f"no offline W&B runs under {args.sweep}: run the sweep with logger=wandb first")
    sampler = load_sampler(args.sampler)
    features = DigitFeatures()
    real, _ = real_digits("heldout", runs[0].config["data"]["resolution"])
    real_feats, real_logits = features.extract(real)
    # what "good" looks like: FD between two halves of the held-out real digits (finite-sample floor)
    half = torch.randperm(len(real_feats), generator=torch.Generator().manual_seed(0))
    a, b = half[: len(half) // 2], half[len(half) // 2 :]
    reference = {"fd": fid(real_feats[a], real_feats[b]), **{k: class_scores(real_logits.softmax(-1))[k] for k in ("marginal_entropy", "confidence")}}

    rows, grids = [], []
    for run in runs:
        job_dir = run.path.parents[1]
        process = run.config["process"]
        prediction_type, beta_schedule = process["prediction_type"], process["scheduler"]["beta_schedule"]
        val = run.metric("val/loss")
        ips = [v for _, v in run.metric("train/device/samples_per_sec") or run.metric("train/images_per_sec")]  # the name before #28
        sample_scores, images = score(job_dir / "pipeline", sampler, features, real_feats, args.num_images, args.steps, args.seed)
        rows.append({
            "job": job_dir.name,
            "name": run.name,
            "group": run.group,
            "prediction_type": prediction_type,
            "beta_schedule": beta_schedule,
            "steps": run.config["trainer"]["max_steps"],
            "final_val_loss": val[-1][1],
            "val_loss_curve": val,
            "images_per_sec": sorted(ips)[len(ips) // 2] if ips else None,
            **sample_scores,
        })
        grids.append((f"{prediction_type} / {beta_schedule}", image_grid(images[:36], rows=6)))

    out = run_dir(args.out, "sweep_digits")
    (out / "results.json").write_text(json.dumps({"sweep": str(args.sweep), "num_images": args.num_images, "sampler": args.sampler, "steps": args.steps,
                                                  "reference_heldout_real": reference, "runs": rows}, indent=2))
    lines = [
        f"W&B group: `{rows[0]['group']}`; {args.num_images} samples per run (sampler={args.sampler}, {args.steps} steps, seed {args.seed}).",
        "",
        "| run | prediction type | beta schedule | final val/loss* | FD to real (lower better) | class entropy (max 2.303) | confidence |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["fd"]):
        lines.append(f"| `{r['name']}` | {r['prediction_type']} | {r['beta_schedule']} | {r['final_val_loss']:.4f} | {r['fd']:.2f} | {r['marginal_entropy']:.3f} | {r['confidence']:.3f} |")
    lines.append(f"| held-out real digits (half vs half) | | | | {reference['fd']:.2f} | {reference['marginal_entropy']:.3f} | {reference['confidence']:.3f} |")
    lines += ["", "*val/loss is in each prediction type's own target space: compare it only within a column of equal type."]
    (out / "results.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        steps, losses = zip(*r["val_loss_curve"])
        axes[0 if r["prediction_type"] == "epsilon" else 1].plot(steps, losses, marker="o", label=r["beta_schedule"])
    for ax, title in zip(axes, ["epsilon", "v_prediction"]):
        ax.set(title=f"val/loss, {title} target", xlabel="step", ylabel="val/loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)

    fig, axes = plt.subplots(2, 3, figsize=(9, 6.5))
    for ax, (title, grid) in zip(axes.flat, sorted(grids)):
        ax.imshow(grid, cmap="gray")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=100)
    print("\n".join(lines))
    print(f"\nwrote results.json, results.md, curves.png and samples.png to {out}")


if __name__ == "__main__":
    main()
