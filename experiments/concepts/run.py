"""A new concept behind a token on the digits latent stack: LoRA vs DoRA vs textual inversion vs DreamBooth.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/concepts/run.py train --stack outputs/ldm_digits --parallel 4
    OMP_NUM_THREADS=1 .venv/bin/python experiments/concepts/run.py score --stack outputs/ldm_digits
    OMP_NUM_THREADS=1 .venv/bin/python experiments/concepts/run.py score --stack outputs/ldm_digits --out experiments/concepts

The concept is experiment=ldm_digits_lora's: digits drawn with bolder strokes (a 2x2 dilation at
8x8). Each method starts from the same base pipeline (``<stack>/pipeline``, experiment=ldm_digits)
and trains ``--max-steps`` steps at batch 64 (one thread each, ``--parallel`` at a time); the
process CPU time of each run is recorded (``os.wait4``: the machine is shared, wall time is not a
measure). Methods and their trigger:

| method | what trains | trigger | data |
|---|---|---|---|
| lora | rank-8 LoRA on the UNet attention (experiment=ldm_digits_lora) | "thick" | thick digits + the same digits plain |
| dora | the same, ``adapter=dora`` (equal rank, steps, lr) | "thick" | same |
| textual_inversion | one new token embedding (experiment=textual_inversion_digits) | "<thick>" | same |
| dreambooth | rank-8 LoRA, prior preservation (experiment=dreambooth_digits) | "sks" | thick digits + 200 base samples |

Scoring: for each method ``--per-class`` samples per digit of "a handwritten digit k" and of
"a handwritten digit k <trigger>" (20 DPM-Solver++ steps, guidance 3, seed 0), through the standard
diffusers loader of each export (``load_lora_weights`` / ``load_textual_inversion``). Per prompt:
the digit classifier's accuracy (trained on plain digits), mean brightness (ink), and the **thick
rate**: the share of samples whose ink exceeds the midpoint between real plain and real thick
digits' mean ink. Trigger success = thick rate with the trigger; base behaviour kept = accuracy
and thick rate without it, next to the base pipeline's. Writes results.json, results.md,
concepts.png (the rates) and samples_<method>.png to ``--out`` (default: a new outputs/experiments/concepts/<time>/).
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

TEMPLATE = "a handwritten digit {name}"
# method -> (train overrides, export folder under the runs dir, trigger)
METHODS: dict[str, tuple[list[str], str]] = {
    "lora": (["experiment=ldm_digits_lora"], "thick"),
    "dora": (["experiment=ldm_digits_lora", "adapter=dora"], "thick"),
    "textual_inversion": (["experiment=textual_inversion_digits"], "<thick>"),
    "dreambooth": (["experiment=dreambooth_digits"], "sks"),
}


def ldm_score():
    """``experiments/ldm_digits/score.py``: the LoRA study's sampling and scoring (one home)."""
    sys.path.insert(0, str(ROOT / "experiments" / "ldm_digits"))
    import score

    return score


def train(args) -> None:
    """Train the methods, ``--parallel`` at a time, one thread each; record each run's CPU time."""
    runs = Path(args.runs)
    pending = list(args.only or METHODS)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    running: dict[int, tuple[str, subprocess.Popen, float]] = {}
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            overrides, _ = METHODS[name]
            steps = args.max_steps
            cmd = [sys.executable, "-m", "diffusion_lab.train", *overrides, f"stack_dir={Path(args.stack).resolve()}", "logger=csv",
                   f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", f"callbacks.sample_grid.every_n_steps={steps}",
                   f"callbacks.model_checkpoint.every_n_train_steps={steps}", f"hydra.run.dir={runs / name}", f"callbacks.export.dirpath={runs / name / 'export'}"]
            if name == "dreambooth":  # no validation set; class images shared across reruns
                cmd = [c for c in cmd if not c.startswith("trainer.val_check_interval")] + [f"data.class_dir={runs / 'class_images'}"]
            print("$", " ".join(cmd[1:]), flush=True)
            runs.mkdir(parents=True, exist_ok=True)
            with open(runs / f"{name}.log", "w") as log:  # the child keeps its own copy of the handle
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[proc.pid] = (name, proc, time.perf_counter())
        pid, status, usage = os.wait4(-1, 0)  # the finished child's own CPU time
        if pid not in running:
            continue
        name, proc, t0 = running.pop(pid)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{name}: training failed; see {runs / name}.log")
        info = {"cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "wall_seconds": round(time.perf_counter() - t0, 1), "max_steps": args.max_steps}
        (runs / name / "train_seconds.json").write_text(json.dumps(info))
        print(f"{name}: {info}", flush=True)


def ink_threshold(resolution: int) -> tuple[float, dict]:
    """Midpoint between the mean ink of real plain and real thick digits, and both means."""
    from diffusion_lab.data.digits import DigitsDataset
    from diffusion_lab.data.transforms import ImageTransform

    means = {}
    for key, thick in (("real_plain", False), ("real_thick", True)):
        ds = DigitsDataset(ImageTransform(resolution, mode="RGB", warn_upscale=False), thicken=thick)
        images = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])
        means[key] = float(((images.mean(dim=(1, 2, 3)) + 1) / 2).mean())
    return (means["real_plain"] + means["real_thick"]) / 2, means


def table(classifier, images: torch.Tensor, per_class: int, threshold: float) -> dict:
    """``accuracy_table`` (classifier accuracy, mean ink) plus the thick rate."""
    out = ldm_score().accuracy_table(classifier, images, per_class)
    ink = (images.mean(dim=(1, 2, 3)) + 1) / 2
    out["thick_rate"] = float((ink > threshold).float().mean())
    return out


def score(args) -> None:
    from diffusers import StableDiffusionPipeline

    from diffusion_lab.data.transforms import image_grid
    from diffusion_lab.diffusion.sampling import load_sampler
    from diffusion_lab.metrics.digits import DigitClassifier
    from experiments.lib.outputs import run_dir

    runs = Path(args.runs)
    out = run_dir(args.out, "concepts")
    classifier = DigitClassifier.load_or_train()

    def base():
        pipe = StableDiffusionPipeline.from_pretrained(Path(args.stack) / "pipeline", safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = load_sampler("dpmpp").scheduler(pipe.scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample(pipe, template):
        return ldm_score().generate(pipe, ldm_score().prompts_for(template), args.per_class, 20, 3.0, 0, args.batch_size)

    pipe = base()
    threshold, real = ink_threshold(pipe.vae.config.sample_size)
    results = {"per_class": args.per_class, "ink_threshold": threshold, **real, "methods": {}}
    results["base"] = table(classifier, sample(pipe, TEMPLATE), args.per_class, threshold)
    grids = []
    for name in args.only or METHODS:
        _, trigger = METHODS[name]
        export = runs / name / "export"
        pipe = base()
        if name == "textual_inversion":
            pipe.load_textual_inversion(str(export))
        else:
            pipe.load_lora_weights(str(export))
        plain, concept = sample(pipe, TEMPLATE), sample(pipe, f"{TEMPLATE} {trigger}")
        seconds = json.loads((runs / name / "train_seconds.json").read_text()) if (runs / name / "train_seconds.json").is_file() else {}
        results["methods"][name] = {"trigger": trigger, "without": table(classifier, plain, args.per_class, threshold),
                                    "with": table(classifier, concept, args.per_class, threshold), **seconds}
        rows = [torch.cat([plain[k * args.per_class : k * args.per_class + 5], concept[k * args.per_class : k * args.per_class + 5]]) for k in range(10)]
        image_grid(torch.cat(rows), rows=10).save(out / f"samples_{name}.png")
        grids.append(name)
        print(name, json.dumps(results["methods"][name]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "concepts.png")
    print(markdown(results))
    print(f"wrote results.json, results.md, concepts.png and samples_*.png to {out}")


def markdown(r: dict) -> str:
    b = r["base"]
    rows = [
        (f"{r['per_class']} samples per digit and prompt; thick = mean ink > {r['ink_threshold']:.3f} (real plain digits "
         f"{r['real_plain']:.3f}, real thick {r['real_thick']:.3f})."),
        "",
        "| method | trigger | thick rate with trigger | accuracy with | ink with | thick rate without | accuracy without | ink without | train CPU s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| base pipeline | - | - | - | - | {b['thick_rate']:.2f} | {b['overall']:.3f} | {b['mean_brightness']:.3f} | - |",
    ]
    for name, m in r["methods"].items():
        w, wo = m["with"], m["without"]
        rows.append(f"| {name} | `{m['trigger']}` | **{w['thick_rate']:.2f}** | {w['overall']:.3f} | {w['mean_brightness']:.3f} | "
                    f"{wo['thick_rate']:.2f} | {wo['overall']:.3f} | {wo['mean_brightness']:.3f} | {m.get('cpu_seconds', '-')} |")
    return "\n".join(rows) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["methods"])
    x = torch.arange(len(names)).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], "thick_rate", "thick rate"), (axes[1], "overall", "digit accuracy")):
        ax.bar(x - 0.2, [r["methods"][n]["with"][key] for n in names], 0.4, label="with trigger")
        ax.bar(x + 0.2, [r["methods"][n]["without"][key] for n in names], 0.4, label="without")
        ax.axhline(r["base"][key], color="k", ls="--", lw=1, label="base pipeline")
        ax.set_xticks(x, names, rotation=15)
        ax.set_ylim(0, 1)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from experiments.lib.outputs import add_out_argument

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["train", "score"])
    p.add_argument("--stack", default="outputs/ldm_digits", help="stack_dir of experiment=ldm_digits (holds pipeline/)")
    p.add_argument("--runs", default="outputs/concepts", help="where the method runs and their exports go")
    p.add_argument("--only", nargs="*", choices=list(METHODS), help="a subset of the methods")
    p.add_argument("--max-steps", type=int, default=600, help="steps of every method (ldm_digits_lora's 600)")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=100)
    add_out_argument(p, "concepts", "experiments/concepts")
    args = p.parse_args()
    torch.set_num_threads(1)
    train(args) if args.command == "train" else score(args)


if __name__ == "__main__":
    main()
