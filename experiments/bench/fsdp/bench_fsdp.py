"""FSDP2 vs DDP on CPU: step time and per-rank peak memory, 2 gloo processes, same run.

    python experiments/bench/fsdp/bench_fsdp.py                    # ~10 min on 2 cores
    python experiments/bench/fsdp/bench_fsdp.py --steps 6 --out /tmp/fsdp   # a quick look

For each backbone (a widened SD-layout latent UNet and a widened FLUX.1 transformer, both trained
in full with AdamW and EMA on captioned digits through the real configs) the same command runs
with ``trainer=ddp_cpu`` and ``trainer=fsdp_cpu``; the strategies alternate in rounds. A callback
(``StepProbe`` below, loaded into the training processes) records every rank's step times and
its peak resident memory (``VmHWM``) above the resident memory at the start of fit, when the model
is built but no gradient or optimizer state exists yet: that difference is the training state
(grads, AdamW moments, EMA, activations) plus the copy of the weights that FSDP frees. Written to
``results.json`` and ``results.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from diffusion_lab.metrics.profiling import status_kb

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def _vm(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MiB."""
    return status_kb(key)[key] / 1024


class StepProbe(pl.Callback):
    """Per rank: wall time of each training step, peak RSS above the RSS at fit start, local
    parameter elements; written to ``<out>/<tag>_rank<k>.json`` after the last step."""

    def __init__(self, out: str, tag: str) -> None:
        self.out, self.tag = Path(out), tag
        self.times: list[float] = []
        self._t = 0.0
        self.rss_start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.rss_start = _vm("VmRSS")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._t)
        if trainer.global_step == trainer.max_steps:
            from torch.distributed.tensor import DTensor

            from diffusion_lab.callbacks.ema import EMACallback

            def mib(tensors) -> float:  # bytes this rank holds: a DTensor's local shard only
                return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors if torch.is_tensor(t)) / 2**20

            params = list(pl_module.parameters())
            opt_state = [v for state in trainer.optimizers[0].state.values() for v in state.values()]
            ema = next(cb.ema for cb in trainer.callbacks if isinstance(cb, EMACallback))
            held = {"weights": mib(params), "grads": mib(p.grad for p in params if p.grad is not None), "optimizer": mib(opt_state),
                    "ema": mib(ema.shadow_params)}
            local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in pl_module.base_backbone.parameters())
            total = sum(p.numel() for p in pl_module.base_backbone.parameters())
            self.out.mkdir(parents=True, exist_ok=True)
            record = {"rank": trainer.global_rank, "step_s": self.times, "rss_start_mib": self.rss_start, "peak_mib": _vm("VmHWM"),
                      "local_params": local, "params": total, "held_mib": held, "state_mib": sum(held.values())}
            (self.out / f"{self.tag}_rank{trainer.global_rank}.json").write_text(json.dumps(record))


BACKBONES = {
    # SD's layout (cross-attention down/up blocks, a mid block) at SD 1.5's first two widths: 77.5M parameters
    "latent_unet": ["experiment=sd_finetune_tiny", "backbone=sd_tiny", "backbone.block_out_channels=[320,640]"],
    # FLUX.1's double- and single-stream blocks, width 12 heads x 64 = 768: 81.5M parameters
    "flux_transformer": ["experiment=flux_finetune_tiny", "backbone=flux_tiny", "+backbone.num_layers=2", "+backbone.num_single_layers=4",
                         "+backbone.num_attention_heads=12", "+backbone.attention_head_dim=64", "+backbone.axes_dims_rope=[16,24,24]"],
}
PIPELINE = {"latent_unet": "sd", "flux_transformer": "flux"}


def run(backbone: str, strategy: str, steps: int, work: Path, pretrained: Path) -> dict:
    tag = f"{backbone}_{strategy}"
    args = [*BACKBONES[backbone], f"model.pretrained={pretrained}", f"trainer={strategy}", f"trainer.max_steps={steps}", "data.batch_size=4",
            "trainer.limit_val_batches=0", "callbacks.sample_grid=null", "callbacks.export=null", "callbacks.noising_strip=null",
            "callbacks.model_checkpoint.every_n_train_steps=100000", "callbacks.learning_curves=null", "logger=none",
            "+callbacks.probe._target_=bench_fsdp.StepProbe", f"+callbacks.probe.out={work / 'probes'}", f"+callbacks.probe.tag={tag}",
            f"hydra.run.dir={work / tag}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONPATH=f"{HERE}{os.pathsep}{REPO}")
    proc = subprocess.run([sys.executable, "-m", "diffusion_lab.train", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{tag} failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads((work / "probes" / f"{tag}_rank{r}.json").read_text()) for r in (0, 1)]
    warm = 2  # the first steps build caches and allocator pools
    return {
        "step_s": statistics.median(t for r in ranks for t in r["step_s"][warm:]),
        "peak_mib": [r["peak_mib"] for r in ranks],
        "train_state_mib": [r["peak_mib"] - r["rss_start_mib"] for r in ranks],
        "state_mib": [r["state_mib"] for r in ranks],
        "held_mib": ranks[0]["held_mib"],
        "local_param_fraction": [r["local_params"] / r["params"] for r in ranks],
        "params_m": ranks[0]["params"] / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    work = REPO / "outputs" / "experiments" / "bench_fsdp" / time.strftime("%Y-%m-%d_%H-%M-%S")
    from diffusion_lab.testing.tiny import build

    pipelines = {kind: build(work / f"tiny_{kind}", kind=kind) for kind in set(PIPELINE.values())}
    results: dict[str, dict[str, list[dict]]] = {b: {"ddp_cpu": [], "fsdp_cpu": []} for b in BACKBONES}
    for rnd in range(args.rounds):
        for backbone in BACKBONES:
            order = ["ddp_cpu", "fsdp_cpu"] if rnd % 2 == 0 else ["fsdp_cpu", "ddp_cpu"]
            for strategy in order:
                r = run(backbone, strategy, args.steps, work / f"round{rnd}", pipelines[PIPELINE[backbone]])
                results[backbone][strategy].append(r)
                print(f"round {rnd} {backbone} {strategy}: {r['step_s']:.3f} s/step, peak {r['peak_mib']} MiB, train state {r['train_state_mib']} MiB", flush=True)

    summary = {}
    for backbone, by in results.items():
        ddp, fsdp = by["ddp_cpu"], by["fsdp_cpu"]
        med = lambda rows, key: statistics.median(x for r in rows for x in (r[key] if isinstance(r[key], list) else [r[key]]))  # noqa: E731
        summary[backbone] = {
            "params_m": ddp[0]["params_m"],
            "ddp": {"step_s": med(ddp, "step_s"), "peak_mib": med(ddp, "peak_mib"), "train_state_mib": med(ddp, "train_state_mib"),
                    "state_mib": med(ddp, "state_mib"), "held_mib": ddp[0]["held_mib"]},
            "fsdp": {"step_s": med(fsdp, "step_s"), "peak_mib": med(fsdp, "peak_mib"), "train_state_mib": med(fsdp, "train_state_mib"),
                     "state_mib": med(fsdp, "state_mib"), "held_mib": fsdp[0]["held_mib"],
                     "local_param_fraction": med(fsdp, "local_param_fraction")},
        }
        s = summary[backbone]
        s["ratio_step_time"] = s["fsdp"]["step_s"] / s["ddp"]["step_s"]
        s["ratio_peak"] = s["fsdp"]["peak_mib"] / s["ddp"]["peak_mib"]
        s["ratio_train_state"] = s["fsdp"]["train_state_mib"] / s["ddp"]["train_state_mib"]
        s["ratio_state"] = s["fsdp"]["state_mib"] / s["ddp"]["state_mib"]
    meta = {"steps": args.steps, "rounds": args.rounds, "batch": 4, "world_size": 2, "load_avg": os.getloadavg(),
            "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": results}, indent=1))
    lines = [
        f"# FSDP2 vs DDP, 2 CPU processes (gloo), full fine-tune + AdamW + EMA, global batch 4, {args.steps} steps x {args.rounds} rounds (git {meta['git']})",
        "",
        "| backbone | params | strategy | step s | weights + grads + AdamW + EMA held / rank, MiB | peak RSS / rank, MiB | RSS growth during fit, MiB | weights held / rank |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for backbone, s in summary.items():
        lines.append(f"| {backbone} | {s['params_m']:.1f}M | DDP | {s['ddp']['step_s']:.2f} | {s['ddp']['state_mib']:.0f} | {s['ddp']['peak_mib']:.0f} | {s['ddp']['train_state_mib']:.0f} | 1.00 |")
        lines.append(f"| | | FSDP2 | {s['fsdp']['step_s']:.2f} | {s['fsdp']['state_mib']:.0f} | {s['fsdp']['peak_mib']:.0f} | {s['fsdp']['train_state_mib']:.0f} | {s['fsdp']['local_param_fraction']:.2f} |")
        lines.append(f"| | | **FSDP2 / DDP** | **{s['ratio_step_time']:.2f}** | **{s['ratio_state']:.2f}** | **{s['ratio_peak']:.2f}** | **{s['ratio_train_state']:.2f}** | |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
