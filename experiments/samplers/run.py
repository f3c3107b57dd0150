"""Sampler study: quality versus cost on the digits DDPM, every sampler from the same x_T.

    .venv/bin/python experiments/samplers/run.py --pipeline outputs/ddpm_digits/runs/<date>/pipeline
    .venv/bin/python experiments/samplers/run.py --pipeline ... --out experiments/samplers   # refresh the committed results

Draws --num-images samples with each (sampler, steps) setting (conf/sampler names; default: DDPM
1000, DDIM 50 and 20, DPM-Solver++ 20 and 10, Euler 50, Heun 25) from one fixed noise tensor,
counts network evaluations (NFE), times them, and scores them against all 1,797 real digits with
FID / KID / IS in the digit classifier's feature space (diffusion_lab.metrics). Writes
results.json, results.md (the table), fid_vs_cost.png (FID vs NFE and vs wall time) and
samples.png (one row per setting, same seeds) into a new outputs/experiments/samplers/<date>_<time>/
(or --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from diffusion_lab.data.transforms import image_grid
from diffusion_lab.metrics.digits import real_digits, score_digit_samples
from diffusion_lab.metrics.features import DigitFeatures
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file (python experiments/<study>/<script>.py): the repo root, for experiments.lib
from experiments.lib.outputs import add_out_argument, run_dir  # noqa: E402
from experiments.lib.samplers import DEFAULT_SETTINGS, compare_samplers  # noqa: E402

NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp": "DPM-Solver++", "euler": "Euler", "heun": "Heun", "pndm": "PNDM"}


def parse_settings(text: str) -> list[tuple[str, int]]:
    """``"ddim:50,dpmpp:10"`` -> ``[("ddim", 50), ("dpmpp", 10)]``."""
    out = []
    for item in text.split(","):
        name, steps = item.split(":")
        out.append((name.strip(), int(steps)))
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "nfe", "network evaluations per image (NFE)"), (axes[1], "seconds_per_image", "wall time per image (s)")):
        for r in rows:
            ax.scatter(r[key], r["fid"], s=40)
            ax.annotate(f"{NAMES.get(r['sampler'], r['sampler'])} {r['steps']}", (r[key], r["fid"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("FID (digit features, lower is better)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, help="exported DDPMPipeline folder (<run dir>/pipeline)")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--settings", default=",".join(f"{n}:{s}" for n, s in DEFAULT_SETTINGS), help="sampler:steps,... (conf/sampler names)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy small machine)")
    add_out_argument(p, "samplers", "experiments/samplers")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(args.pipeline)
    unet = pipe.unet.to(args.device).eval()
    size = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
    extractor = DigitFeatures()
    reference, _ = real_digits("all", size)
    real_features, _ = extractor.extract(reference, desc="reference features")
    rows, images = compare_samplers(
        unet, pipe.scheduler, real_features, extractor, parse_settings(args.settings), args.num_images, args.batch_size, args.seed, args.device
    )
    for r in rows:
        digits = score_digit_samples(images[f"{r['sampler']}-{r['steps']}"], classifier=extractor.classifier, reference=False)
        r["digit_confidence"], r["digit_marginal_entropy"] = digits["confidence"], digits["marginal_entropy"]

    out = run_dir(args.out, "samplers")
    meta = {
        "pipeline": str(args.pipeline),
        "num_images": args.num_images,
        "num_reference": len(reference),
        "resolution": size,
        "seed": args.seed,
        "device": args.device if args.device != "cpu" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "features": "digits (DigitClassifier penultimate layer, 128-d)",
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = [
        f"{args.num_images} samples per setting vs {len(reference)} real digits at {size} px, same x_T (seed {args.seed}); {meta['device']}",
        "",
        "| sampler | steps | NFE | s / image | FID | KID | IS | digit confidence | class entropy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {NAMES.get(r['sampler'], r['sampler'])} | {r['steps']} | {r['nfe']} | {r['seconds_per_image']:.4f} | {r['fid']:.1f} | "
            f"{r['kid_mean']:.1f} ± {r['kid_std']:.1f} | {r['is_mean']:.2f} | {r['digit_confidence']:.3f} | {r['digit_marginal_entropy']:.3f} |"
        )
    (out / "results.md").write_text("\n".join(table) + "\n")
    plot(rows, out / "fid_vs_cost.png", f"{Path(args.pipeline).resolve().parent.name}: {args.num_images} samples per sampler, {size} px digits")
    grid = torch.cat([images[f"{r['sampler']}-{r['steps']}"][:12] for r in rows])
    image_grid(grid, rows=len(rows)).save(out / "samples.png")
    print("\n".join(table))
    print(f"\nwrote results.json, results.md, fid_vs_cost.png and samples.png to {out}")


if __name__ == "__main__":
    main()
