"""How LoRA relates to full fine-tuning: trained LoRA vs full fine-tune vs LoRA extracted from it (digits, CPU).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/lora_vs_full/run.py train --stack outputs/ldm_digits --max-steps 600
    OMP_NUM_THREADS=1 .venv/bin/python experiments/lora_vs_full/run.py extract --stack outputs/ldm_digits
    OMP_NUM_THREADS=1 .venv/bin/python experiments/lora_vs_full/run.py score --stack outputs/ldm_digits --out experiments/lora_vs_full/results
    OMP_NUM_THREADS=1 .venv/bin/python experiments/lora_vs_full/run.py compare PIPELINE_A PIPELINE_B   # L1 of two pipelines' samples

The concept fine-tune of experiment=ldm_digits_lora (``data=digits_concept``: each digit plain and
drawn thick, the thick ones captioned with the trigger "thick"), on the base pipeline
``<stack>/pipeline`` (experiment=ldm_digits), every variant at the same ``--max-steps`` and batch 64:

| variant | what trains | lr |
|---|---|---|
| full | every UNet weight (``adapter=none``); text encoder and VAE frozen as in the LoRA runs | ``--full-lr`` (1e-4) |
| lora_r{4,16,64} | a LoRA of rank r on the UNet attention (to_q/k/v/out), alpha = r (scale 1) | ``--lora-lr`` (1e-3, the experiment's) |
| extracted_r{4,16,64} | nothing: the SVD of full - base, every Linear / 1x1-conv layer, rank r (``diffusion_lab.lora extract``) | - |

The digits UNet is 32 / 64 channels wide, so rank 64 is at or above every layer's size: lora_r64
holds more numbers than the attention weights it adapts, and extracted_r64 is each layer's full
rank (``extract --energy 1.0``; ``--rank 64`` is refused above the smallest layer).

Per variant: parameters (trainable, or held by the LoRA file), step time (median of batch /
``train/device/samples_per_sec`` over the logged steps), peak memory (max ``train/peak_memory_mb``: the
process's max RSS on CPU), the run's CPU and wall seconds (``os.wait4``), sizes on disk (the last
checkpoint; the export: the LoRA file, or the full UNet's weights), and, scored like
experiments/concepts/run.py (``--per-class`` samples per digit, 20 DPM-Solver++ steps, guidance 3,
seed 0, each variant loaded through diffusers: ``from_pretrained`` / ``load_lora_weights``): the thick
rate with the trigger (and the share both thick and read as the right digit), digit accuracy with and without it, and the distance of each variant's samples
to the full fine-tune's for the same seeds and prompts (mean |pixel difference| in [0, 1]; the
base pipeline's distance is the yardstick). Writes results.json, results.md, lora_vs_full.png and
samples.png to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a file (python experiments/<study>/<script>.py): the repo root, for experiments.lib
RANKS = (4, 16, 64)
TEMPLATE = "a handwritten digit {name}"
TRIGGER = "thick"


def concepts():
    """experiments/concepts/run.py (thick rate, ink threshold, the scorer's sampling): one home."""
    spec = importlib.util.spec_from_file_location("concepts_run", ROOT / "experiments" / "concepts" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trained_variants(args) -> dict[str, list[str]]:
    """variant -> training overrides (on top of experiment=ldm_digits_lora)."""
    out = {"full": ["adapter=none", f"model.optimizer.lr={args.full_lr}"]}
    for r in RANKS:
        out[f"lora_r{r}"] = [f"adapter.rank={r}", f"adapter.alpha={r}", f"model.optimizer.lr={args.lora_lr}"]
    return out


def train(args) -> None:
    """Train the variants one after the other (one thread); record each run's CPU and wall time."""
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    steps = args.max_steps
    for name, overrides in trained_variants(args).items():
        if args.only and name not in args.only:
            continue
        run = runs / name
        cmd = [sys.executable, "-m", "diffusion_lab.train", "experiment=ldm_digits_lora", *overrides, f"stack_dir={Path(args.stack).resolve()}",
               "logger=csv", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", f"callbacks.sample_grid.every_n_steps={steps}",
               f"callbacks.model_checkpoint.every_n_train_steps={steps}", f"hydra.run.dir={run}", f"callbacks.export.dirpath={run / 'export'}"]
        print("$", " ".join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        with open(runs / f"{name}.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own CPU time (the machine is shared)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{name}: training failed; see {runs / name}.log")
        info = {"cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "wall_seconds": round(time.perf_counter() - t0, 1), "max_steps": steps,
                "overrides": overrides}
        (run / "train_seconds.json").write_text(json.dumps(info))
        print(f"{name}: {info}", flush=True)


def extract(args) -> None:
    """LoRA of rank r from the full fine-tune (the library's SVD extraction), and how much of the
    full fine-tune's squared weight difference each rank keeps."""
    from diffusion_lab.export import lora_tools

    runs = Path(args.runs)
    base, full = str(Path(args.stack) / "pipeline"), str(runs / "full" / "export")
    _, _, base_unet = lora_tools.load_backbone(base)
    _, _, full_unet = lora_tools.load_backbone(full)
    deltas, covered = lora_tools.weight_deltas(base_unet, full_unet)
    sq = {k: torch.linalg.svdvals(d).pow(2) for k, d in deltas.items()}
    total = sum(float(s.sum()) for s in sq.values())
    for r in RANKS:
        t0 = time.perf_counter()
        # the digits UNet is 32 / 64 channels wide: a rank above a layer's size is that layer's full
        # rank, which extract asks for as --energy 1.0 (it refuses --rank above the smallest layer)
        capped = any(min(d.shape) < r for d in deltas.values())
        summary = lora_tools.extract(base, full, str(runs / f"extracted_r{r}"), **({"energy": 1.0} if capped else {"rank": r}))
        kept = sum(float(s[:r].sum()) for s in sq.values()) / total
        info = {"extract_seconds": round(time.perf_counter() - t0, 2), "flag": "--energy 1.0" if capped else f"--rank {r}", "layers": summary["layers"], "covered": covered, "energy_kept": kept,
                "share_of_full_delta": covered * kept}
        (runs / f"extracted_r{r}" / "extract.json").write_text(json.dumps(info))
        print(f"extracted_r{r}: {info}", flush=True)


def safetensors_params(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def run_costs(run: Path) -> dict:
    """Step time and peak memory from the run's csv log, sizes on disk, CPU / wall seconds."""
    batch = int(next(line.split(":")[1] for line in (run / "config.yaml").read_text().splitlines() if line.strip().startswith("batch_size:")))
    speed, memory = [], []
    with open(run / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            ips = row.get("train/device/samples_per_sec") or row.get("train/images_per_sec")  # the name before #28
            if ips:
                speed.append(batch / float(ips))
            if row.get("train/peak_memory_mb"):
                memory.append(float(row["train/peak_memory_mb"]))
    out = {"s_per_step": statistics.median(speed) if speed else None, "peak_memory_mb": max(memory, default=None), "checkpoint_mb": (run / "checkpoints" / "last.ckpt").stat().st_size / 2**20}
    seconds = run / "train_seconds.json"
    return out | (json.loads(seconds.read_text()) if seconds.is_file() else {})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def score(args) -> None:
    from diffusers import StableDiffusionPipeline

    from diffusion_lab.data.transforms import image_grid
    from diffusion_lab.diffusion.sampling import load_sampler
    from diffusion_lab.metrics.digits import DigitClassifier
    from experiments.lib.outputs import run_dir

    c = concepts()
    ldm = c.ldm_score()
    runs = Path(args.runs)
    out = run_dir(args.out, "lora_vs_full")
    classifier = DigitClassifier.load_or_train()

    def load(path: Path):
        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = load_sampler("dpmpp").scheduler(pipe.scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample(pipe, template):
        return ldm.generate(pipe, ldm.prompts_for(template), args.per_class, 20, 3.0, 0, args.batch_size)

    base_dir = Path(args.stack) / "pipeline"
    names = ["base", "full", *(f"lora_r{r}" for r in RANKS), *(f"extracted_r{r}" for r in RANKS)]
    names = [n for n in names if n == "base" or (runs / n).is_dir()]
    threshold, real = c.ink_threshold(load(base_dir).vae.config.sample_size)
    results = {"per_class": args.per_class, "ink_threshold": threshold, **real, "trigger": TRIGGER,
               "base_unet_sha256": sha256(base_dir / "unet" / "diffusion_pytorch_model.safetensors"), "variants": {}}
    samples = {}
    for name in names:
        if name == "full":
            pipe = load(runs / "full" / "export")
        else:
            pipe = load(base_dir)
            if name != "base":
                pipe.load_lora_weights(str(runs / name / ("export" if name.startswith("lora") else "")))
        plain, concept = sample(pipe, TEMPLATE), sample(pipe, f"{TEMPLATE} {TRIGGER}")
        samples[name] = (plain, concept)
        v = {"without": c.table(classifier, plain, args.per_class, threshold), "with": c.table(classifier, concept, args.per_class, threshold)}
        v["with"]["thick_and_right_digit"] = thick_and_right(classifier, concept, args.per_class, threshold)
        if name == "full":
            weights = runs / "full" / "export" / "unet" / "diffusion_pytorch_model.safetensors"
            v |= run_costs(runs / name) | {"params": safetensors_params(weights), "export_mb": weights.stat().st_size / 2**20}
        elif name != "base":
            from diffusion_lab.export.lora_tools import lora_file

            weights = lora_file(runs / name / ("export" if name.startswith("lora") else ""))
            v |= {"params": safetensors_params(weights), "export_mb": weights.stat().st_size / 2**20}
            v |= run_costs(runs / name) if name.startswith("lora") else json.loads((runs / name / "extract.json").read_text())
        results["variants"][name] = v
        print(name, {k: v[k] for k in v if k not in ("with", "without")}, f"thick with {v['with']['thick_rate']:.2f} acc {v['without']['overall']:.3f}", flush=True)
    if "full" in samples:  # closeness to the full fine-tune: same seeds, same prompts
        f_plain, f_concept = samples["full"]
        for name, (plain, concept) in samples.items():
            results["variants"][name]["l1_to_full_without"] = float((plain - f_plain).abs().mean() / 2)
            results["variants"][name]["l1_to_full_with"] = float((concept - f_concept).abs().mean() / 2)
    cols = 10  # one sample per digit: without the trigger | with it
    rows = [torch.cat([p[:: args.per_class][:cols], q[:: args.per_class][:cols]]) for p, q in samples.values()]
    labelled_grid(image_grid(torch.cat(rows), rows=len(rows)), list(samples), out / "samples.png")
    results["sample_rows"] = list(samples)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "lora_vs_full.png")
    print(markdown(results))
    print(f"wrote results.json, results.md, lora_vs_full.png and samples.png to {out}")


def labelled_grid(grid, names: list[str], path: Path) -> None:
    """The sample grid with each row's variant written beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(grid.width / 80 + 1.2, grid.height / 80 + 0.4))
    ax.imshow(grid)
    ax.set_yticks([(i + 0.5) * grid.height / len(names) for i in range(len(names))], names)
    ax.set_xticks([grid.width / 4, 3 * grid.width / 4], ["without the trigger (digits 0-9)", f"with '{TRIGGER}' (digits 0-9)"])
    ax.tick_params(length=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def thick_and_right(classifier, images: torch.Tensor, per_class: int, threshold: float) -> float:
    """Share of samples that are thick (the thick-rate test) *and* read as the prompted digit: mean
    ink alone also counts washed-out blobs as thick."""
    labels = torch.arange(10).repeat_interleave(per_class)
    right = classifier.predict_proba(images).argmax(-1) == labels
    thick = (images.mean(dim=(1, 2, 3)) + 1) / 2 > threshold
    return float((right & thick).float().mean())


def compare(args) -> None:
    """L1 between two pipeline folders' samples (same prompts and seeds): e.g. two full fine-tunes,
    the yardstick for "close to the full fine-tune"."""
    from diffusers import StableDiffusionPipeline

    from diffusion_lab.diffusion.sampling import load_sampler

    ldm = concepts().ldm_score()
    out = {}
    for template in (TEMPLATE, f"{TEMPLATE} {TRIGGER}"):
        images = []
        for path in args.pipelines:
            pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
            pipe.scheduler = load_sampler("dpmpp").scheduler(pipe.scheduler)
            pipe.set_progress_bar_config(disable=True)
            images.append(ldm.generate(pipe, ldm.prompts_for(template), args.per_class, 20, 3.0, 0, args.batch_size))
        out["l1_with" if TRIGGER in template else "l1_without"] = float((images[0] - images[1]).abs().mean() / 2)
    print(json.dumps({"pipelines": args.pipelines, "per_class": args.per_class, **out}))


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(r: dict) -> str:
    rows = [
        (f"{r['per_class']} samples per digit and prompt (seed 0, 20 DPM-Solver++ steps, guidance 3); thick = mean ink > {r['ink_threshold']:.3f} "
         f"(real plain digits {r['real_plain']:.3f}, real thick {r['real_thick']:.3f}); L1 = mean |pixel difference| in [0, 1] to the full "
         "fine-tune's samples for the same seeds and prompts."),
        "",
        "| variant | params | s/step | peak MB | CPU s | checkpoint MB | export MB | thick rate with trigger | thick & right digit, with | accuracy with | thick rate without | accuracy without | L1 to full, with | L1 to full, without |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in r["variants"].items():
        extra = f" (keeps {100 * v['share_of_full_delta']:.0f}% of the update)" if "share_of_full_delta" in v else ""
        rows.append(
            f"| {name}{extra} | {fmt(v.get('params'), ',')} | {fmt(v.get('s_per_step'), '.3f')} | {fmt(v.get('peak_memory_mb'), '.0f')} | "
            f"{fmt(v.get('cpu_seconds'), '.0f')} | {fmt(v.get('checkpoint_mb'), '.2f')} | {fmt(v.get('export_mb'), '.3f')} | "
            f"**{v['with']['thick_rate']:.2f}** | {v['with']['thick_and_right_digit']:.2f} | {v['with']['overall']:.3f} | {v['without']['thick_rate']:.2f} | {v['without']['overall']:.3f} | "
            f"{fmt(v.get('l1_to_full_with'), '.4f')} | {fmt(v.get('l1_to_full_without'), '.4f')} |"
        )
    return "\n".join(rows) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    v = r["variants"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for kind, marker in (("lora", "o-"), ("extracted", "s--")):
        names = [f"{kind}_r{k}" for k in RANKS if f"{kind}_r{k}" in v]
        if not names:
            continue
        params = [v[n]["params"] for n in names]
        label = "trained LoRA" if kind == "lora" else "extracted from full"
        axes[0].plot(params, [v[n]["with"]["thick_rate"] for n in names], marker, label=label)
        axes[1].plot(params, [v[n]["with"]["thick_and_right_digit"] for n in names], marker, label=label)
        if "l1_to_full_with" in v[names[0]]:
            axes[2].plot(params, [v[n]["l1_to_full_with"] for n in names], marker, label=f"{label}, with trigger")
            axes[2].plot(params, [v[n]["l1_to_full_without"] for n in names], marker, alpha=0.5, label=f"{label}, without")
        for n, x, y in zip(names, params, [v[n]["with"]["thick_rate"] for n in names]):
            axes[0].annotate(n.rsplit("_", 1)[1], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for key, ax, sub in (("thick_rate", axes[0], "with"), ("thick_and_right_digit", axes[1], "with")):
        if "full" in v:
            ax.plot([v["full"]["params"]], [v["full"][sub][key]], "r*", ms=10, label=f"full fine-tune ({v['full']['params']:,} params)")
            ax.axhline(v["full"][sub][key], color="r", lw=0.8)
        ax.axhline(v["base"][sub][key], color="k", ls=":", lw=1, label="base pipeline")
    if "l1_to_full_with" in v["base"]:
        axes[2].axhline(v["base"]["l1_to_full_with"], color="k", ls=":", lw=1, label="base pipeline, with trigger")
    for ax, title in zip(axes, ("thick rate with the trigger", "thick and the right digit, with the trigger", "L1 to the full fine-tune's samples")):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("parameters (LoRA file; full: the UNet)")
        ax.set_title(title)
        ax.legend(fontsize=7, loc="lower right" if ax is not axes[2] else "upper right")
    axes[0].set_ylim(0, 1.08)
    axes[1].set_ylim(0, 1.08)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from experiments.lib.outputs import add_out_argument

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["train", "extract", "score", "compare"])
    p.add_argument("pipelines", nargs="*", help="compare: two pipeline folders")
    p.add_argument("--stack", default="outputs/ldm_digits", help="stack_dir of experiment=ldm_digits (holds pipeline/)")
    p.add_argument("--runs", default="outputs/lora_vs_full", help="where the runs, their exports and the extracted LoRAs go")
    p.add_argument("--only", nargs="*", help="train a subset: full, lora_r4, lora_r16, lora_r64")
    p.add_argument("--max-steps", type=int, default=600, help="steps of every trained variant (ldm_digits_lora's 600)")
    p.add_argument("--full-lr", type=float, default=1e-4, help="full fine-tune lr (10x below the LoRA's)")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA lr (experiment=ldm_digits_lora's)")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=100)
    add_out_argument(p, "lora_vs_full", "experiments/lora_vs_full/results")
    args = p.parse_args()
    torch.set_num_threads(1)
    {"train": train, "extract": extract, "score": score, "compare": compare}[args.command](args)


if __name__ == "__main__":
    main()
