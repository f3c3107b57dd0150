"""Training and sampling speed, side by side in one process: the framework's Lightning loop
against a plain PyTorch loop over the same model, batch and data, and the effect of each speed
switch (a config key) on training images/s and peak memory.

    python experiments/bench/bench.py                         # CPU: demo pixel DDPM, fixed cost per step, tiny SD fine-tune
    python experiments/bench/bench.py --device cuda           # + SD-1.5-sized UNet at 64x64 latents, bf16, MFU
    python experiments/bench/bench.py --quick                 # smoke run (2 rounds of 2 steps)

Writes ``<device>.json`` and ``.md`` into a new ``outputs/experiments/bench/<date>_<time>/``;
``--out experiments/bench/results`` refreshes the committed results.

Method. Every case of a family is the family's real config (``conf/``, composed as the CLI would)
plus the overrides of one switch; cases with the same overrides share one built model. After a
priming run per case (one-off costs: caching, compiling, worker start-up; reported as
``startup_s``), the cases train in rounds: each round runs every case for ``--warmup`` untimed
and ``--steps`` timed steps, in an order rotated from round to round. A block's images/s is
images of the timed steps / their wall time, data loading included. A switch's effect is the
median over rounds of its images/s / the baseline's images/s *in the same round*, so a slow
spell of a shared machine hits both sides. The load average is recorded with the results.
Peak memory: CUDA ``max_memory_allocated`` per block; on CPU one fresh process per case (the
resident-set peak of a few steps above the size once model and data are built), because inside
the benchmark process a block reuses memory that earlier cases freed.

Framework = a ``pytorch_lightning.Trainer`` from the config with the per-step machinery on (loss
and grad-norm logging, CSV logger, LR monitor, nan/inf guard, RNG/signal callbacks, gradient
clipping, LR schedule); callbacks that do extra model work off in both loops: EMA, sample grids,
noising strip, checkpoints, export, progress bar, validation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TQDM_DISABLE", "1")  # no caching progress bars in the log

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

import diffusion_lab  # noqa: E402,F401  (config resolvers)
from diffusion_lab.components import speed  # noqa: E402
from diffusion_lab.testing import tiny  # noqa: E402
from diffusion_lab.metrics import profiling  # noqa: E402
from diffusion_lab.modules import LatentDiffusion  # noqa: E402
from diffusion_lab.modules.diffusion_module import batch_len  # noqa: E402
from diffusion_lab.utils.instantiate import instantiate_callbacks, instantiate_loggers  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file (python experiments/<study>/<script>.py): the repo root, for experiments.lib
from experiments.lib.outputs import add_out_argument, run_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONF = str(REPO / "conf")
Loop = Literal["lightning", "plain"]

# per-step machinery stays on; work the plain loop does not do is off (see the docstring)
BENCH = [
    "logger=csv",
    "callbacks.ema=null",
    "callbacks.sample_grid=null",
    "callbacks.noising_strip=null",
    "callbacks.model_checkpoint=null",
    "callbacks.export=null",
    "callbacks.progress_bar=null",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
    "trainer.limit_val_batches=0",
]


@dataclass
class Case:
    name: str
    overrides: list[str] = field(default_factory=list)
    loop: Loop = "lightning"
    note: str = ""


@dataclass
class Family:
    """Cases measured against ``cases[0]`` (the framework with the defaults)."""

    name: str
    config: list[str]
    cases: list[Case]
    sample: dict | None  # sampling-speed spec, None: not measured
    steps: int | None = None  # timed steps per block (default ``--steps``)
    title: str = ""


def families(args, tiny_sd_dir: Path) -> list[Family]:
    plain = Case("plain PyTorch loop", loop="plain", note="same model object, batch, data loader")
    # the switches every family measures (after its own)
    switches = [
        Case("channels_last", ["model.channels_last=true"]),
        Case("attention=eager", ["model.attention=eager"], note="baseline is sdpa (diffusers' default)"),
        Case("fused AdamW", ["model.optimizer.fused=true"]),
        Case("2 workers + pinned memory", ["data.num_workers=2", "data.persistent_workers=true", "data.pin_memory=" + str(args.device == "cuda").lower()]),
        Case("torch.compile UNet", ["model.compile_backbone=true"], note="compile time is in startup_s"),
    ]
    pixel = Family(
        "pixel",
        ["experiment=ddpm_digits", f"backbone={args.pixel_unet}", f"data.batch_size={args.pixel_batch}", "trainer.accelerator=" + args.device],
        [Case("framework (Lightning)"), plain, *switches],
        {"num_images": 16, "steps": args.sample_steps},
        title="the demo recipe (`make demo`)" if args.pixel_unet == "ddpm_digits" else "",
    )
    # Lightning's fixed cost per step, which a small step shows most: a near-zero-compute model
    fixed = Family(
        "fixed_cost",
        ["experiment=ddpm_digits", "backbone=tiny", "data.batch_size=2", "trainer.accelerator=" + args.device],
        [Case("framework (Lightning)"), plain],
        None,
        steps=10 * args.steps,
        title="a near-zero-compute step (tiny UNet, batch 2): the framework's fixed cost per step",
    )
    latent = Family(
        "latent",
        ["experiment=sd_finetune_tiny", f"model.pretrained={tiny_sd_dir}", "data.resolution=16", f"data.batch_size={args.latent_batch}", "trainer.accelerator=" + args.device],
        [
            Case("framework (Lightning), no cache"),
            Case("plain PyTorch loop, no cache", loop="plain", note=plain.note),
            Case("latent + text caching", ["model.cache=true"], note="cache build time is in startup_s"),
            Case("frozen VAE + text encoder in bf16", ["vae.dtype=bfloat16", "text_encoder.dtype=bfloat16"]),
            *switches,
        ],
        {"num_images": 16, "steps": args.sample_steps, "guidance_scale": 3.0},
        title="tiny SD fine-tune, VAE/UNet cost split of SD 1.5 (`tiny_sd --sd15-split`)",
    )
    out = {"pixel": pixel, "fixed_cost": fixed, "latent": latent}
    if args.device == "cuda" or args.sd15_on_cpu:
        # SD 1.5's UNet (860M, random init) on 64x64 latents: 512 px images through a 4-level
        # (8x) tiny VAE, tiny CLIP text encoder widened to SD's 768; both cached, so the step is the UNet's
        sd15 = Family(
            "sd15",
            [
                "model=latent_sd", f"backbone={args.sd15_unet}", "vae=tiny", "vae.vae.block_out_channels=[16,32,32,32]",
                "text_encoder=tiny", "text_encoder.text_encoder.hidden_size=${backbone.cross_attention_dim}", "process=vp_sd", "data=digits_captioned",
                f"data.resolution={args.sd15_resolution}", f"data.batch_size={args.sd15_batch}", "model.cache=true",
                "trainer=gpu" if args.device == "cuda" else "trainer=cpu", "trainer.precision=" + args.precision,
                "model.optimizer.lr=1e-5",
            ],
            [
                Case("framework (Lightning), cached"),
                Case("plain PyTorch loop, cached", loop="plain", note=plain.note),
                *switches,
            ],
            {"num_images": 4, "steps": args.sample_steps, "guidance_scale": 7.5},
        )
        out["sd15"] = sd15
    return [out[name] for name in args.families if name in out]


# ---- building -------------------------------------------------------------------------------
@dataclass
class Built:
    cfg: object
    module: pl.LightningModule
    datamodule: pl.LightningDataModule
    startup_s: float | None = None


def compose_cfg(overrides: list[str], out_dir: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=overrides + [f"paths.output_dir={out_dir}", f"paths.log_dir={out_dir}"])


def build(overrides: list[str], out_dir: Path) -> Built:
    cfg = compose_cfg(overrides, out_dir)
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = instantiate(cfg.data.datamodule)
    module = instantiate(cfg.model)
    datamodule.setup("fit")
    return Built(cfg, module, datamodule)


# ---- measuring ------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory while a block runs: CUDA ``max_memory_allocated``, or on CPU the peak resident
    set size (sampled every 10 ms) above the size when the block started."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.start)
            self._stop.wait(0.01)

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.start, self._stop = self._rss(), threading.Event()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()

    @property
    def mib(self) -> float:
        return self.peak / 2**20


@dataclass
class Block:
    """One timed block: images/s of wall time, images per second of this process's CPU time
    (what other processes on a shared machine disturb least), peak memory."""

    images_per_s: float
    images_per_cpu_s: float
    peak_mem_mib: float


class Clock:
    """Wall and process CPU time from the end of the last warmup step to the end of the last
    timed step (CUDA synchronised at both ends)."""

    def __init__(self, warmup: int, steps: int, device: str) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.done = self.images = 0
        self.start = self.end = (0.0, 0.0)

    def step_end(self, n_images: int) -> None:
        self.done += 1
        if self.device == "cuda" and self.done in (self.warmup, self.warmup + self.steps):
            torch.cuda.synchronize()
        now = (time.perf_counter(), time.process_time())
        if self.done == self.warmup:
            self.start = now
        elif self.done > self.warmup:
            self.images += n_images
            self.end = now

    def block(self, mem: PeakMemory) -> Block:
        wall, cpu = self.end[0] - self.start[0], self.end[1] - self.start[1]
        return Block(self.images / wall, self.images / max(cpu, 1e-9), mem.mib)


class StepClock(pl.Callback):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.clock.step_end(batch_len(batch))  # after the optimizer step


def lightning_block(built: Built, warmup: int, steps: int, device: str) -> Block:
    """``trainer.fit`` for warmup + steps, timed over the last ``steps``."""
    clock = Clock(warmup, steps, device)
    callbacks = instantiate_callbacks(built.cfg.callbacks) + [StepClock(clock)]
    trainer = instantiate(built.cfg.trainer, callbacks=callbacks, logger=instantiate_loggers(built.cfg.logger) or False, max_steps=warmup + steps)
    with PeakMemory(device) as mem:
        trainer.fit(built.module, datamodule=built.datamodule)
    return clock.block(mem)


def plain_block(built: Built, warmup: int, steps: int, device: str) -> Block:
    """The same training step written as a plain PyTorch loop (diffusers-example style) over the
    framework's own UNet, process (noising, target, loss), optimizer settings, LR schedule,
    gradient clipping and data loader."""
    module, cfg = built.module.to(device), built.cfg
    module.train()
    unet = module.backbone
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = module.optimizer_factory(params=params)
    lr_scheduler = module.lr_scheduler_factory(optimizer=optimizer, num_training_steps=warmup + steps) if module.lr_scheduler_factory else None
    process = module.process  # the noising, target and loss the framework trains with
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled="bf16" in str(cfg.trainer.precision))
    clip = cfg.trainer.gradient_clip_val
    latent = isinstance(module, LatentDiffusion)  # pixel models have the identity codec
    if latent:
        vae, tokenizer, text_encoder = module.codec.vae, module.conditioner.tokenizer, module.conditioner.text_encoder
        p_drop = module.hparams.caption_dropout
        with torch.no_grad():
            empty = text_encoder(tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(device))[0].float()

    def step(batch: dict) -> torch.Tensor:
        cond = {}
        if not latent:
            x0 = batch["pixel_values"].to(device, non_blocking=True)
        else:
            with torch.no_grad():
                if "latent_moments" in batch:  # cached posterior parameters
                    moments = batch["latent_moments"].to(device, non_blocking=True)
                else:
                    moments = vae.encode(batch["pixel_values"].to(device, vae.dtype, non_blocking=True)).latent_dist.parameters.float()
                x0 = DiagonalGaussianDistribution(moments).sample() * vae.config.scaling_factor
                drop = torch.rand(x0.shape[0]) < p_drop
                if "encoder_hidden_states" in batch:  # cached text states
                    states = batch["encoder_hidden_states"].to(device, non_blocking=True)
                    states = torch.where(drop.to(device).view(-1, 1, 1), empty, states)
                else:
                    captions = ["" if d else c for c, d in zip(batch["caption"], drop.tolist())]
                    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
                    states = text_encoder(ids.to(device))[0].float()
            cond = {"encoder_hidden_states": states}
        noised = process.noised(x0)
        with autocast:
            pred = unet(noised.model_input, noised.timestep, **cond).sample
        loss = process.loss(pred, noised)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    loader = built.datamodule.train_dataloader()
    clock = Clock(warmup, steps, device)
    with PeakMemory(device) as mem:
        while clock.done < warmup + steps:
            for batch in loader:
                step(batch)
                clock.step_end(batch_len(batch))
                if clock.done == warmup + steps:
                    break
    return clock.block(mem)


def measure_block(built: Built, case: Case, warmup: int, steps: int, device: str) -> Block:
    return (lightning_block if case.loop == "lightning" else plain_block)(built, warmup, steps, device)


def memory_probe(fam: Family, case: Case, args, work: Path) -> float:
    """CPU peak memory of training (MiB), in a fresh process: the peak resident set size during a
    few steps above the size once model and data are built (grads, optimizer state, activations,
    cache). In the benchmark process, blocks reuse memory that earlier cases freed."""
    built = build(fam.config + BENCH + case.overrides, work)
    return measure_block(built, case, 1, 2, args.device).peak_mem_mib


def probe_memory_in_subprocess(fam: Family, case: Case, tiny_sd_dir: Path) -> float | None:
    """``memory_probe`` of one case in a new interpreter (same command line + ``--memory-probe``)."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--memory-probe", fam.name, case.name, "--tiny-sd-dir", str(tiny_sd_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PEAK_MIB ")]
    if proc.returncode != 0 or not lines:
        print(f"  memory probe of {fam.name} / {case.name} failed:\n{proc.stderr[-1500:]}", flush=True)
        return None
    return float(lines[-1].split()[1])


def flops_per_image(built: Built, device: str) -> int:
    """Model FLOPs (UNet forward + backward; frozen parts included when not cached) per image."""
    module = built.module.to(device)
    batch = next(iter(built.datamodule.train_dataloader()))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled="bf16" in str(built.cfg.trainer.precision))
    with autocast:
        flops = profiling.train_step_flops(lambda: module.diffusion_loss(batch))
    module.zero_grad(set_to_none=True)
    return flops // batch_len(batch)


def frozen_parts_flops(built: Built, device: str) -> dict:
    """FLOPs per image of what latent + text caching removes (VAE encoder, text encoder forward)
    next to the UNet training step's, and the speedup they bound caching to."""
    module = built.module.to(device)
    res = int(built.cfg.data.resolution)
    vae, text_encoder, tokenizer = module.codec.vae, module.conditioner.text_encoder, module.conditioner.tokenizer
    ids = tokenizer(["a handwritten digit seven"], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        states = text_encoder(ids)[0].float()
    x, t = torch.zeros(module.latent_shape(1), device=device), torch.tensor([500], device=device)
    out = {
        "unet_train_step": profiling.train_step_flops(lambda: module.backbone(x, t, encoder_hidden_states=states).sample.float().square().mean()),
        "vae_encode": profiling.forward_flops(lambda: vae.encode(torch.zeros(1, 3, res, res, device=device, dtype=vae.dtype))),
        "text_encoder": profiling.forward_flops(lambda: text_encoder(ids)),
    }
    module.zero_grad(set_to_none=True)
    out["caching_bound"] = sum(out.values()) / out["unet_train_step"]
    return out


def sampling_speed(built: Built, spec: dict, repeats: int, device: str) -> dict:
    """Images/s of ``module.generate`` (the sampler of the config, ``steps`` steps, CFG if latent)."""
    module = built.module.to(device)
    n = spec["num_images"]
    kwargs = {}
    if "guidance_scale" in spec:
        kwargs = {"cond_batch": {"caption": [f"a handwritten digit {w}" for w in ("seven", "three") * n][:n]}, "guidance_scale": spec["guidance_scale"]}
    times = []
    for i in range(repeats + 1):  # the first is warmup
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        module.generate(n, num_inference_steps=spec["steps"], generator=torch.Generator().manual_seed(i), **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times[1:])
    return {"images_per_s": n / dt, "num_images": n, "steps": spec["steps"], "scheduler": type(module.sampling_scheduler()).__name__, **{k: v for k, v in spec.items() if k == "guidance_scale"}}


def ratio_summary(ratios: list[float]) -> dict:
    """Median and quartiles of per-round ratios."""
    if len(ratios) < 2:
        q1 = q3 = ratios[0]
    else:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3, "per_round": ratios}


def run_family(fam: Family, args, work: Path) -> dict:
    print(f"\n== {fam.name}: {' '.join(fam.config)}", flush=True)
    builds: dict[tuple, Built] = {}
    for case in fam.cases:
        key = tuple(case.overrides)
        if key not in builds:
            builds[key] = build(fam.config + BENCH + case.overrides, work / fam.name / str(len(builds)))
    base = builds[()]
    info: dict = {"config": fam.config, "batch_size": int(base.cfg.data.batch_size)}
    info["unet_parameters"] = sum(p.numel() for p in base.module.base_backbone.parameters())
    info["attention_processors"] = sorted(speed.attention_processors(base.module.base_backbone))

    # prime: one-off costs (cache, compile, workers), and the first steps
    for case in fam.cases:
        built = builds[tuple(case.overrides)]
        t0 = time.perf_counter()
        measure_block(built, case, 1, 1, args.device)
        if built.startup_s is None and case.loop == "lightning":
            built.startup_s = time.perf_counter() - t0
        print(f"  primed {case.name} ({time.perf_counter() - t0:.1f} s)", flush=True)

    # after priming: batches of a caching config are cached now, so FLOPs are the UNet step's
    probe = next(iter(base.datamodule.train_dataloader()))
    probe = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in probe.items()}
    with torch.no_grad():
        info["attention_kernels"] = dict(profiling.attention_kernels(lambda: base.module.to(args.device).diffusion_loss(probe)))
    info["flops_per_image"] = flops_per_image(base, args.device)
    if isinstance(base.module, LatentDiffusion):
        info["flops_split"] = frozen_parts_flops(base, args.device)

    blocks: dict[str, list[Block]] = {c.name: [] for c in fam.cases}
    load = []
    for r in range(args.rounds):
        order = fam.cases[r % len(fam.cases):] + fam.cases[: r % len(fam.cases)]
        for case in order:
            blocks[case.name].append(measure_block(builds[tuple(case.overrides)], case, args.warmup, fam.steps or args.steps, args.device))
        load.append(os.getloadavg()[0])
        line = "  ".join(f"{c.name[:18]}={blocks[c.name][-1].images_per_s:.1f}" for c in fam.cases)
        print(f"  round {r + 1}/{args.rounds} (load {load[-1]:.1f}): {line}", flush=True)

    baseline = blocks[fam.cases[0].name]
    cases = {}
    for case in fam.cases:
        runs = blocks[case.name]
        cases[case.name] = {
            "overrides": case.overrides,
            "loop": case.loop,
            "note": case.note,
            "images_per_s": [b.images_per_s for b in runs],
            "images_per_cpu_s": [b.images_per_cpu_s for b in runs],
            "median_images_per_s": statistics.median(b.images_per_s for b in runs),
            "median_images_per_cpu_s": statistics.median(b.images_per_cpu_s for b in runs),
            # same-round ratios to the framework default
            "speedup": ratio_summary([b.images_per_s / a.images_per_s for b, a in zip(runs, baseline)]),
            "speedup_cpu_time": ratio_summary([b.images_per_cpu_s / a.images_per_cpu_s for b, a in zip(runs, baseline)]),
            "peak_mem_mib": statistics.median(b.peak_mem_mib for b in runs),
            "startup_s": builds[tuple(case.overrides)].startup_s if case.loop == "lightning" else None,
        }
    if args.device == "cpu" and not args.no_memory_probe:  # CPU: the in-process RSS growth says little
        for case in fam.cases:
            cases[case.name]["peak_mem_mib"] = probe_memory_in_subprocess(fam, case, args.tiny_sd_dir)
            print(f"  peak memory {case.name}: {cases[case.name]['peak_mem_mib']} MiB", flush=True)
    info["cases"] = cases
    info["load_average_per_round"] = load
    # overhead = the framework's extra time per image = plain images/s / framework images/s - 1
    plain_name = next(c.name for c in fam.cases if c.loop == "plain")
    plain = cases[plain_name]
    info["framework_overhead_pct"] = {
        "wall": {k: 100 * (v - 1) for k, v in plain["speedup"].items() if k != "per_round"},
        "cpu_time": {k: 100 * (v - 1) for k, v in plain["speedup_cpu_time"].items() if k != "per_round"},
    }
    if args.device == "cuda":
        peak = args.peak_tflops * 1e12 if args.peak_tflops else profiling.peak_bf16_flops(torch.cuda.get_device_name())
        info["peak_bf16_flops"] = peak
        if peak:
            for c in cases.values():
                c["mfu"] = info["flops_per_image"] * c["median_images_per_s"] / peak
    # the framework's extra time per step (same-round pairs), in ms: what a bigger step dilutes
    info["fixed_cost_ms_per_step"] = ratio_summary(
        [1000 * info["batch_size"] * (1 / a.images_per_cpu_s - 1 / b.images_per_cpu_s) for b, a in zip(blocks[plain_name], baseline)]
    )
    if fam.sample:
        info["sampling"] = sampling_speed(base, fam.sample, args.sample_repeats, args.device)
    ov = info["framework_overhead_pct"]
    print(f"  overhead {ov['wall']['median']:+.1f}% (wall) {ov['cpu_time']['median']:+.1f}% (CPU time), {info['fixed_cost_ms_per_step']['median']:.2f} CPU-ms per step", flush=True)
    return info


# ---- reporting ------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"# Benchmark: {meta['device_name']} ({meta['device']})",
        "",
        f"`{meta['command']}` at {meta['date']}, git {meta['git']}; torch {meta['torch']}, {meta['threads']} thread(s); "
        f"{meta['rounds']} rounds x ({meta['warmup']} warmup + {meta['steps']} timed steps) per case; {meta['wall_s'] / 60:.0f} min in all.",
        f"Load average (1 min) at start {meta['load_start'][0]:.1f}, at end {meta['load_end'][0]:.1f} on {meta['cpus']} CPUs.",
        "Speedups are medians [quartiles] over rounds of images/s divided by the framework default's in the same round.",
        "",
    ]
    for name, fam in result["families"].items():
        mfu = "peak_bf16_flops" in fam
        lines += [
            f"## {name}" + (f": {fam['title']}" if fam.get("title") else ""),
            "",
            f"Batch {fam['batch_size']}, UNet {fam['unet_parameters'] / 1e6:.2f}M parameters, "
            f"{fam['flops_per_image'] / 1e9:.3f} GFLOP per image per training step (frozen encoders included when not cached). "
            f"`{' '.join(fam['config'])}`",
            "",
            "| case | switch | images/s | speedup (wall) | images/CPU-s | speedup (CPU time) | peak mem MiB | startup s |" + (" MFU |" if mfu else ""),
            "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if mfu else ""),
        ]
        for case_name, c in fam["cases"].items():
            switch = " ".join(c["overrides"]) or ("(plain loop)" if c["loop"] == "plain" else "(defaults)")
            startup = f"{c['startup_s']:.1f}" if c["startup_s"] is not None else ""
            w, t = c["speedup"], c["speedup_cpu_time"]
            row = (
                f"| {case_name} | `{switch}` | {c['median_images_per_s']:.1f} | {w['median']:.2f}x [{w['q1']:.2f}, {w['q3']:.2f}] "
                f"| {c['median_images_per_cpu_s']:.1f} | {t['median']:.2f}x [{t['q1']:.2f}, {t['q3']:.2f}] | {_mib(c['peak_mem_mib'])} | {startup} |"
            )
            if mfu:
                row += f" {100 * c.get('mfu', float('nan')):.1f}% |"
            lines.append(row)
        ov, fixed = fam["framework_overhead_pct"], fam["fixed_cost_ms_per_step"]
        lines += [
            "",
            f"Framework overhead vs the plain loop: **{ov['wall']['median']:+.1f}%** wall time (quartiles {ov['wall']['q1']:+.1f}% .. "
            f"{ov['wall']['q3']:+.1f}%), **{ov['cpu_time']['median']:+.1f}%** CPU time ({ov['cpu_time']['q1']:+.1f}% .. {ov['cpu_time']['q3']:+.1f}%); "
            f"{fixed['median']:.2f} CPU-ms per step ({fixed['q1']:.2f} .. {fixed['q3']:.2f}).",
        ]
        if "flops_split" in fam:
            f = fam["flops_split"]
            lines.append(
                f"FLOPs per image: UNet training step {f['unet_train_step'] / 1e6:.1f} M, VAE encoder {f['vae_encode'] / 1e6:.1f} M "
                f"({f['vae_encode'] / f['unet_train_step']:.2f}x the UNet's), text encoder {f['text_encoder'] / 1e6:.1f} M: "
                f"caching can save at most {f['caching_bound']:.2f}x of the FLOPs (plus data loading and per-call overheads)."
            )
        if "sampling" in fam:
            sampling = fam["sampling"]
            lines.append(
                f"Sampling: {sampling['images_per_s']:.2f} images/s ({sampling['scheduler']}, {sampling['steps']} steps, "
                f"{sampling['num_images']} images" + (f", CFG {sampling['guidance_scale']}" if "guidance_scale" in sampling else "") + ")."
            )
        lines += [f"Attention: processors {fam['attention_processors']}; aten attention kernels in one training step: {fam['attention_kernels'] or 'none (math)'}.", ""]
    return "\n".join(lines)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--families", nargs="+", default=["pixel", "fixed_cost", "latent", "sd15"], help="pixel fixed_cost latent sd15 (sd15 needs --device cuda)")
    p.add_argument("--only", nargs="*", help="keep only cases whose name starts with one of these (the first two cases are always kept)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per block")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    p.add_argument("--pixel-unet", default="ddpm_digits", help="backbone option of the pixel family (ddpm_digits: the demo's)")
    p.add_argument("--pixel-batch", type=int, default=64)
    p.add_argument("--latent-batch", type=int, default=32)
    p.add_argument("--sd15-batch", type=int, default=16)
    p.add_argument("--sd15-resolution", type=int, default=512, help="512 px = 64x64 latents through the 8x tiny VAE")
    p.add_argument("--sd15-on-cpu", action="store_true", help="run the sd15 family on CPU (a smoke test: with --sd15-unet sd_tiny)")
    p.add_argument("--sd15-unet", default="sd15", help="backbone option of the sd15 family (sd_tiny: smoke test)")
    p.add_argument("--precision", default="bf16-mixed", help="trainer.precision of the sd15 family")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU (default: from the GPU name)")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--sample-repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds x (1 warmup + 2 steps), small batches")
    add_out_argument(p, "bench", "experiments/bench/results")
    p.add_argument("--no-memory-probe", action="store_true", help="CPU: skip the per-case peak memory runs in fresh processes")
    p.add_argument("--memory-probe", nargs=2, metavar=("FAMILY", "CASE"), help=argparse.SUPPRESS)  # internal: one probe
    p.add_argument("--tiny-sd-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.sample_repeats, args.sample_steps = 2, 2, 1, 1, 2
        args.pixel_batch, args.latent_batch, args.sd15_batch, args.sd15_resolution = 16, 8, 2, 64
    torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(exists and is not empty|LeafSpec|requires torchvision).*")

    if args.memory_probe:  # a child of probe_memory_in_subprocess: one case, print its peak
        name, case_name = args.memory_probe
        fam = next(f for f in families(args, Path(args.tiny_sd_dir)) if f.name == name)
        case = next(c for c in fam.cases if c.name == case_name)
        with tempfile.TemporaryDirectory(prefix="bench_probe_") as tmp:
            print(f"PEAK_MIB {memory_probe(fam, case, args, Path(tmp)):.1f}", flush=True)
        return {}

    load_start = os.getloadavg()
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        work = Path(tmp)
        tiny_dir = tiny.build(work / "tiny_sd", vae_kwargs=tiny.SD15_SPLIT_VAE)
        args.tiny_sd_dir = tiny_dir
        fams = families(args, tiny_dir)
        for fam in fams:
            if args.only:
                fam.cases = fam.cases[:2] + [c for c in fam.cases[2:] if any(c.name.startswith(o) for o in args.only)]
        results = {fam.name: run_family(fam, args, work) for fam in fams}

    result = {
        "meta": {
            "command": "python experiments/bench/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_s": time.time() - t_start,
            "git": git_commit(),
            "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "load_start": load_start,
            "load_end": os.getloadavg(),
            **{k: getattr(args, k) for k in ("rounds", "steps", "warmup", "quick")},
        },
        "families": results,
    }
    out = run_dir(args.out, "bench")
    stem = args.device + ("_quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(f"\nwrote {stem}.json and {stem}.md to {out}")
    return result


if __name__ == "__main__":
    main()
