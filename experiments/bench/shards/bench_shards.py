"""Does memory grow with the data? Peak RSS and training images/s of `data=shards` over 4,000 and
40,000 images, against `data=image_folder` over the same images and the in-RAM latent cache.

    python experiments/bench/shards/bench_shards.py                  # ~20 min on 2 shared cores
    python experiments/bench/shards/bench_shards.py --sizes 400 4000 --steps 20   # smoke run
    python experiments/bench/shards/bench_shards.py --buckets        # aspect-bucketed shards vs folder

Writes ``results.json`` and ``results.md`` here (``--out`` elsewhere). Method: N augmented digit
images (scikit-learn's 1,797 digits, each drawn at a random scale, angle, place and colour on a
32 px canvas) are written as PNGs into a temp folder, and from it pixel shards and (for the cache
comparison) encoded shards with ``python -m diffusion_lab.prepare``. Each case is one fresh
``python -m diffusion_lab.train`` process (tiny UNet, batch 16, ``data.num_workers=0`` so all data
work is in the measured process, no validation, grids, EMA or export). ``StepClock`` (below, put
in by ``_target_``) reads the process's CPU time after a warm-up of 5 steps and at the end:
images/s = images of the timed steps / CPU seconds (the machine is shared: wall time is not
comparable); peak RSS = ``ru_maxrss`` of the training process at the end. ``--buckets``: the
images are resized to four aspect ratios and both the folder and the shards use
``data.buckets=true`` (``results_buckets.*``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
PIXEL = ["backbone=tiny", "data.resolution=32"]
LATENT = ["model=latent_sd", "vae=tiny", "text_encoder=tiny", "backbone=sd_tiny", "process=vp_sd", "data.resolution=32"]
QUIET = [
    "trainer=cpu", "logger=csv", "data.batch_size=16", "data.num_workers=0", "trainer.limit_val_batches=0",
    "callbacks.sample_grid=null", "callbacks.noising_strip=null", "callbacks.export=null", "callbacks.ema=null",
    "callbacks.progress_bar=null", "callbacks.model_checkpoint.every_n_train_steps=100000",
]
WARMUP = 5


class StepClock(pl.Callback):
    """CPU seconds of this process from step ``WARMUP`` to the end, and its peak RSS, as JSON."""

    def __init__(self, path: str, batch_size: int) -> None:
        self.path, self.batch_size = path, batch_size
        self.start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == WARMUP and self.start is None:
            self.start = time.process_time()

    def on_train_end(self, trainer, pl_module) -> None:
        cpu = time.process_time() - self.start
        steps = trainer.global_step - WARMUP
        out = {"steps": steps, "cpu_s": cpu, "images_per_cpu_s": steps * self.batch_size / cpu, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        # RSS at the end split into anonymous memory and mapped files (litdata memory-maps its chunks)
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("Rss"))
        out |= {f"end_{k.lower()}_mb": int(v.split()[0]) / 1024 for k, v in status.items() if k in ("RssAnon", "RssFile")}
        Path(self.path).write_text(json.dumps(out))


BUCKET_SHAPES = [(32, 32), (24, 40), (40, 24), (28, 36)]  # (h, w) with --buckets


def make_images(root: Path, n: int, seed: int = 0, shapes: list[tuple[int, int]] | None = None) -> None:
    """``n`` 32 px RGB PNGs of augmented digits, captioned in metadata.jsonl; with ``shapes``,
    image ``i`` is resized to ``shapes[i % len(shapes)]``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from diffusion_lab.data.digits import DIGIT_NAMES

    digits = load_digits()
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        k = int(rng.integers(len(digits.images)))
        im = Image.fromarray((digits.images[k] / 16 * 255).astype(np.uint8), "L")
        size = int(rng.integers(16, 29))
        im = im.resize((size, size), Image.BICUBIC).rotate(float(rng.uniform(-20, 20)), resample=Image.BICUBIC)
        canvas = Image.new("L", (32, 32))
        canvas.paste(im, (int(rng.integers(0, 33 - size)), int(rng.integers(0, 33 - size))))
        ink, paper = rng.integers(128, 256, 3), rng.integers(0, 96, 3)
        a = np.asarray(canvas, dtype=np.float32)[..., None] / 255
        out = Image.fromarray((a * ink + (1 - a) * paper).astype(np.uint8), "RGB")
        if shapes:
            h, w = shapes[i % len(shapes)]
            out = out.resize((w, h), Image.BICUBIC)
        out.save(root / f"{i:06d}.png")
        rows.append(json.dumps({"file_name": f"{i:06d}.png", "text": f"a handwritten digit {DIGIT_NAMES[digits.target[k]]}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(HERE), str(REPO)]))


def run(module: str, args: list[str], log: Path) -> None:
    t = time.time()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{module} failed ({proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    print(f"  {module} {' '.join(a for a in args if a.startswith('data=') or 'cache' in a or 'encode' in a)}: {time.time() - t:.0f} s wall", flush=True)


def train_case(tmp: Path, name: str, model: list[str], data: list[str], steps: int) -> dict:
    out = tmp / "runs" / name
    clock = out / "clock.json"
    args = [*QUIET, *model, *data, f"trainer.max_steps={steps}", f"hydra.run.dir={out}",
            f"+callbacks.clock={{_target_: bench_shards.StepClock, path: '{clock}', batch_size: 16}}"]
    out.mkdir(parents=True, exist_ok=True)
    run("diffusion_lab.train", args, out.parent / f"{name}.log")
    return {"case": name, **json.loads(clock.read_text())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[4000, 40000])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--no-cache", action="store_true", help="skip the latent (cache / encoded shards) cases")
    ap.add_argument("--buckets", action="store_true", help="aspect-bucketed images: bucketed shards vs the bucketed folder")
    ap.add_argument("--out", type=Path, default=HERE)
    a = ap.parse_args()
    name = "results_buckets" if a.buckets else "results"
    bucketed = ["data.buckets=true", "data.bucket_step=8"] if a.buckets else []
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        tmp = Path(tmp)
        for n in a.sizes:
            images, shards = tmp / f"images_{n}", tmp / f"shards_{n}"
            t = time.time()
            make_images(images, n, shapes=BUCKET_SHAPES if a.buckets else None)
            print(f"{n} images: {time.time() - t:.0f} s", flush=True)
            folder = ["data=image_folder", f"data.root={images}", "data.val_fraction=0.01", "data.caption_column=text", *bucketed]
            run("diffusion_lab.prepare", [*folder, "data.resolution=32", f"out_dir={shards}", f"hydra.run.dir={tmp / 'prep'}"], tmp / f"prepare_{n}.log")
            sharded = ["data=shards", f"data.root={shards}"]
            results.append({"images": n, **train_case(tmp, f"pixel_shards_{n}", PIXEL, sharded, a.steps)})
            results.append({"images": n, **train_case(tmp, f"pixel_folder_{n}", PIXEL, folder, a.steps)})
            if not a.no_cache and not a.buckets and n == min(a.sizes):
                encoded = tmp / f"encoded_{n}"
                run("diffusion_lab.prepare", [*folder, *LATENT, "prepare.encode=true", f"out_dir={encoded}", f"hydra.run.dir={tmp / 'prep'}"], tmp / f"encode_{n}.log")
                results.append({"images": n, **train_case(tmp, f"latent_folder_{n}", LATENT, folder, a.steps)})
                results.append({"images": n, **train_case(tmp, f"latent_cache_{n}", LATENT, [*folder, "model.cache=true"], a.steps)})
                results.append({"images": n, **train_case(tmp, f"latent_encoded_shards_{n}", LATENT, ["data=shards", f"data.root={encoded}"], a.steps)})
            json.dump(results, open(a.out / f"{name}.json", "w"), indent=2)  # after every size: partial results survive
    meta = {"python": platform.python_version(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "steps": a.steps, "warmup": WARMUP, "batch_size": 16, "buckets": a.buckets}
    json.dump({"meta": meta, "results": results}, open(a.out / f"{name}.json", "w"), indent=2)
    lines = ["| case | images | peak RSS (MB) | at the end: anonymous / mapped files (MB) | images / CPU s |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['images']:,} | {r['peak_rss_mb']:.0f} | {r.get('end_rssanon_mb', 0):.0f} / {r.get('end_rssfile_mb', 0):.0f} | {r['images_per_cpu_s']:.1f} |" for r in results]
    shards = {r["images"]: r["peak_rss_mb"] for r in results if r["case"].startswith("pixel_shards")}
    if len(shards) > 1:
        lo, hi = min(shards), max(shards)
        lines.append(f"\npixel shards: peak RSS at {hi:,} images / at {lo:,} images = {shards[hi] / shards[lo]:.3f}")
    (a.out / f"{name}.md").write_text("\n".join(lines) + f"\n\n{json.dumps(meta)}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
