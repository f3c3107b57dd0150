"""Backbones compared on digits: the class-conditional UNet (backbone=ddpm_digits, 2.80M parameters)
vs the DiT (backbone=dit_digits, 2.85M in use), same recipe (experiment=dit_digits: flow matching,
batch 64, AdamW 1e-3 with constant LR after 200 warm-up steps, EMA), equal training CPU time.

    .venv/bin/python experiments/backbones/run.py train                  # both at once, one thread each
    .venv/bin/python experiments/backbones/run.py score
    .venv/bin/python experiments/backbones/run.py score --out experiments/backbones   # refresh the committed results
    .venv/bin/python experiments/backbones/run.py speed --out experiments/backbones   # CPU s per training step only

Training stops after ``--cpu-seconds`` of each process's CPU time (experiments/lib/cpu_budget.py), so a
faster backbone gets more steps; a constant LR makes the stopping step not matter to the schedule.
Scoring (diffusion_lab.metrics.digit_quality): 500 samples, labels 0..9 in turn, DPM-Solver++ 20
steps from the checkpoint's EMA weights: FID in digit features vs all 1,797 real digits, the
classifier's confidence, and class accuracy (generated digit == requested label). The DiT is also
scored with classifier-free guidance (its null label); the UNet has no null label to guide with.
Writes results.json, results.md, quality.png and samples.png (speed: speed.json) to a new
outputs/experiments/backbones/<date>_<time>/ (or --out; --out experiments/backbones refreshes the committed copy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a file (python experiments/<study>/<script>.py): the repo root, for experiments.lib
COMMON = ["experiment=dit_digits", "logger=csv", "lr_scheduler@model.lr_scheduler=constant_with_warmup",
          "trainer.max_time=null", "trainer.max_steps=100000", "trainer.val_check_interval=500",
          "callbacks.sample_grid.every_n_steps=100000", "callbacks.model_checkpoint.every_n_train_steps=100000", "callbacks.progress_bar=null"]
BACKBONES: dict[str, list[str]] = {
    "unet": ["backbone=ddpm_digits", "backbone.num_class_embeds=10"],
    "dit": [],
}
GUIDANCE = {"unet": [1.0], "dit": [1.0, 2.0]}


def used_parameters(net) -> int:
    """Parameters a forward pass can touch: a DiT's label rows between the classes and the null row
    (kept for DiTPipeline's hard-coded null label 1000) are never used."""
    n = sum(p.numel() for p in net.parameters())
    if hasattr(net, "transformer_blocks"):
        embedder = net.transformer_blocks[0].norm1.emb.class_embedder
        n -= len(net.transformer_blocks) * (embedder.num_classes - 10) * embedder.embedding_table.embedding_dim
    return n


def train(args) -> None:
    from experiments.lib.cpu_jobs import train_jobs

    budget = f"+callbacks.cpu_budget={{_target_:experiments.lib.cpu_budget.CPUTimeBudget,seconds:{args.cpu_seconds}}}"
    jobs = {name: [*COMMON, *extra, budget] for name, extra in BACKBONES.items()}
    train_jobs(jobs, Path(args.runs), parallel=len(jobs), quiet=True, cwd=str(ROOT))


def score(args) -> None:
    from diffusion_lab.data.transforms import image_grid
    from diffusion_lab.inference.checkpoints import load_module
    from diffusion_lab.metrics.digit_quality import digit_quality
    from diffusion_lab.metrics.features import DigitFeatures

    torch.set_num_threads(1)
    extractor, rows, grids = DigitFeatures(), [], []
    for name in BACKBONES:
        run = Path(args.runs) / name
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        module = load_module(str(run / "checkpoints" / "last.ckpt"), use_ema=True)
        cpu = json.loads((run / "train_cpu.json").read_text())
        for w in GUIDANCE[name]:
            found, images = digit_quality(module, args.num_images, args.steps, seed=args.seed, guidance_scale=w, extractor=extractor)
            rows.append({"backbone": name, "guidance_scale": w, "parameters": used_parameters(module.base_backbone),
                         "train_steps": ckpt["global_step"], **cpu, **found})
            grids.append(images[:20])
            print(rows[-1], flush=True)
    from experiments.lib.outputs import run_dir

    out = run_dir(args.out, "backbones")
    (out / "results.json").write_text(json.dumps({"num_images": args.num_images, "steps": args.steps, "seed": args.seed, "cpu_seconds_budget": args.cpu_seconds, "rows": rows}, indent=2) + "\n")
    table = [
        f"{args.num_images} samples (labels 0..9 in turn, seed {args.seed}), DPM-Solver++ {args.steps} steps, EMA weights, vs 1,797 real digits",
        "",
        "| backbone | parameters | guidance | train steps | train CPU min (whole run) | FID (digit features) | confidence | class accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(f"| {r['backbone']} | {r['parameters'] / 1e6:.2f}M | {r['guidance_scale']:g} | {r['train_steps']} | {r['cpu_seconds'] / 60:.1f} | "
                     f"{r['fid']:.2f} | {r['confidence']:.3f} | {r['accuracy']:.3f} |")
    (out / "results.md").write_text("\n".join(table) + "\n")
    image_grid(torch.cat(grids), rows=len(grids)).save(out / "samples.png")
    plot(rows, out / "quality.png")
    print("\n".join(table))


def compose_train(overrides: list[str]):
    """``conf/train.yaml`` composed with ``overrides`` as ``python -m diffusion_lab.train`` would."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from diffusion_lab.utils.config_path import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def speed(args) -> None:
    """CPU seconds per training step of each backbone (the recipe's batch of 64, one thread,
    ``time.process_time`` over ``--speed-steps`` steps after 3 warm-up steps): what equal CPU time
    means in steps. Writes speed.json to --out."""
    import time

    from hydra.utils import instantiate

    torch.set_num_threads(1)
    rows = []
    for name, extra in BACKBONES.items():
        cfg = compose_train([*COMMON, *extra])
        torch.manual_seed(0)
        module = instantiate(cfg.model)
        dataset = instantiate(cfg.data.datamodule.dataset)
        batch = {"pixel_values": torch.stack([dataset[i]["pixel_values"] for i in range(64)]), "label": torch.tensor([dataset[i]["label"] for i in range(64)])}
        opt = module.optimizer_factory(params=module.trainable_parameters())
        for i in range(3 + args.speed_steps):
            if i == 3:
                t0 = time.process_time()
            loss = module.diffusion_loss(batch, train=True)
            loss.backward()
            opt.step()
            opt.zero_grad()
        seconds = (time.process_time() - t0) / args.speed_steps
        rows.append({"backbone": name, "parameters": used_parameters(module.base_backbone), "cpu_seconds_per_step": round(seconds, 4)})
        print(rows[-1], flush=True)
    from experiments.lib.outputs import run_dir

    out = run_dir(args.out, "backbones")
    (out / "speed.json").write_text(json.dumps({"batch_size": 64, "steps": args.speed_steps, "threads": 1, "rows": rows}, indent=2) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['backbone']}\nw={r['guidance_scale']:g}\n{r['train_steps']} steps" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, key, title in zip(axes, ("fid", "confidence", "accuracy"), ("FID (digit features, lower is better)", "classifier confidence", "class accuracy")):
        ax.bar(labels, [r[key] for r in rows], color=["tab:blue" if r["backbone"] == "unet" else "tab:orange" for r in rows])
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("UNet vs DiT on digits at equal parameters and training CPU time (experiments/backbones)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    from experiments.lib.outputs import add_out_argument

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["train", "score", "speed"])
    p.add_argument("--runs", default=str(ROOT / "outputs" / "backbones"))
    add_out_argument(p, "backbones", "experiments/backbones")
    p.add_argument("--cpu-seconds", type=int, default=270, help="training CPU time of each backbone")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed-steps", type=int, default=20)
    args = p.parse_args()
    {"train": train, "score": score, "speed": speed}[args.stage](args)


if __name__ == "__main__":
    main()
