"""Training-time memory and step time of LoRA on a Flux-width transformer with a bf16 / int8 / nf4 / float8 frozen
base, gradient checkpointing off and on (CPU, one run; issue #24).

    OMP_NUM_THREADS=1 python experiments/bench/quantization/bench_quant.py      # writes results.json + results.md here

The backbone is a ``FluxTransformer2DModel`` of FLUX.1's real width (hidden 3072 = 24 heads x 128, T5 width 4096,
CLIP pooled 768) with 1 double- and 2 single-stream blocks (FLUX.1-dev has 19 + 38), saved once in bf16 with
``save_pretrained`` and loaded by the library's own path (``components/pretrained.from_pretrained`` with what
``quantization=<option>`` gives it), LoRA rank 16 on the attention projections (``components/adapters``), AdamW on
the LoRA; 64 image + 32 text tokens for every option, and 1024 image tokens (512 px) for bf16 and nf4, where
activations and so gradient checkpointing start to count. Every configuration runs in a fresh subprocess. Per configuration (README.md says why each is measured so):

- ``weights_bytes``: the exact storage of the backbone's parameters and buffers after loading, counting what a
  quantized weight really holds (bitsandbytes' packed data + ``SCB`` / ``quant_state``; torchao's and quanto's
  tensor subclasses through their inner tensors), independent of the allocator;
- ``steady_mb``: resident set (``VmRSS``) after loading, quantizing and adding the LoRA, with the weights in
  anonymous memory (a tensor still memory-mapped from the safetensors file is copied, as a move to a GPU would),
  after ``gc.collect()`` and glibc ``malloc_trim(0)``, minus the resident set after the imports;
- ``train_peak_mb``: after ``/proc/self/clear_refs`` <- 5 resets the high-water mark, the peak resident set
  (``VmHWM``) over the training steps minus ``steady_mb``'s resident set: activations, gradients, optimizer state
  and the quantized kernels' temporaries;
- ``step_s``: the median of the timed steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from diffusion_lab.metrics.profiling import reset_peak, settle, status_kb

HERE = Path(__file__).resolve().parent
# option -> (quantization= name, backend, weights)
OPTIONS = {
    "bf16": ("none", None, None),
    "int8": ("int8", "bitsandbytes", "int8"),
    "int8_torchao": ("int8_torchao", "torchao", "int8"),
    "nf4": ("nf4", "bitsandbytes", "nf4"),
    "float8": ("float8", "torchao", "float8"),
    "float8_quanto": ("float8", "quanto", "float8"),  # not in the default run (optimum-quanto's qfloat8)
}
DEFAULT_OPTIONS = ["bf16", "int8", "int8_torchao", "nf4", "float8"]
WIDTH = dict(num_attention_heads=24, attention_head_dim=128, joint_attention_dim=4096, pooled_projection_dim=768)
BLOCKS = dict(num_layers=1, num_single_layers=2)
IMAGE_TOKENS, TEXT_TOKENS = 64, 32  # a 16x16 latent (128 px) packed 2x2, and a short T5 context
LONG_TOKENS, LONG_OPTIONS = 1024, ["bf16", "nf4"]  # 512 px: where activations, and so checkpointing, start to count
# glibc's mmap threshold fixed (not raised by each free) so a freed large tensor goes back to the OS and the
# resident set tracks the live tensors instead of the heap's high-water mark
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
MB = 1 << 20


# ---- exact weight bytes --------------------------------------------------------------------------
def _inner_tensors(obj) -> list:
    """The plain tensors that hold ``obj``'s data: a tensor subclass (torchao's Int8Tensor / Float8Tensor,
    quanto's QTensor) through ``__tensor_flatten__``; bitsandbytes' Params4bit / Int8Params through their data and
    the tensors they carry as attributes (``SCB``, ``quant_state.absmax`` / ``code`` / nested ``state2``)."""
    import torch

    if isinstance(obj, torch.Tensor) and type(obj) not in (torch.Tensor, torch.nn.Parameter) and hasattr(obj, "__tensor_flatten__"):
        names, _ = obj.__tensor_flatten__()
        return [t for name in names for t in _inner_tensors(getattr(obj, name))]
    if isinstance(obj, torch.Tensor):
        extra = [v for v in vars(obj).values() if isinstance(v, torch.Tensor) or type(v).__name__ == "QuantState"]
        return [obj.data if isinstance(obj, torch.nn.Parameter) else obj] + [t for v in extra for t in _inner_tensors(v)]
    if type(obj).__name__ == "QuantState":  # bitsandbytes 4-bit statistics (absmax, code, offset, state2)
        return [t for v in vars(obj).values() if isinstance(v, torch.Tensor) or type(v).__name__ == "QuantState" for t in _inner_tensors(v)]
    return []


def weights_bytes(model) -> int:
    """Bytes of ``model``'s parameters and buffers as stored (each storage counted once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        for t in _inner_tensors(tensor):
            key = (t.data_ptr(), t.numel(), t.dtype)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def materialize(model) -> None:
    """Copy every plain tensor still backed by the memory-mapped safetensors file into anonymous memory, as a move
    to the device would: without it a bf16 base counts only the pages training touches (and counts them there)."""
    import torch

    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None and type(t) in (torch.Tensor, torch.nn.Parameter):
                    t.data = t.data.clone()


# ---- one configuration ---------------------------------------------------------------------------
def save_backbone(folder: Path) -> None:
    """A random Flux-width transformer saved in bf16 as ``folder/transformer``."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(in_channels=64, guidance_embeds=True, axes_dims_rope=(16, 56, 56), **WIDTH, **BLOCKS)
    model.to(torch.bfloat16).save_pretrained(folder / "transformer")


def measure(folder: str, option: str, checkpointing: bool, steps: int, image_tokens: int = IMAGE_TOKENS) -> dict:
    """One configuration, in this (fresh) process."""
    import torch
    from diffusers import FluxPipeline

    from diffusion_lab.components.adapters import add_lora, lora_config
    from diffusion_lab.components.pretrained import from_pretrained
    from diffusion_lab.components.quantization import load_kwargs

    torch.manual_seed(0)
    settle()
    start = status_kb("VmRSS")["VmRSS"]
    name, backend, weights = OPTIONS[option]
    quantization = load_kwargs("diffusers", backend, weights, dtype="bfloat16", name=name)
    t0 = time.perf_counter()
    model = from_pretrained("diffusers.FluxTransformer2DModel", folder, subfolder="transformer", dtype=None if quantization else "bfloat16", quantization=quantization)
    load_s = time.perf_counter() - t0
    loaded = status_kb("VmHWM", "RssFile")  # the loading peak: not the training footprint, recorded to show the gap
    materialize(model)
    base_bytes = weights_bytes(model)
    add_lora(model, lora_config(rank=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    h = w = int(image_tokens**0.5) * 2  # latent side before 2x2 packing
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.bfloat16)
    txt_ids = torch.zeros(TEXT_TOKENS, 3, dtype=torch.bfloat16)
    settle()
    steady = status_kb("VmRSS", "RssAnon", "RssFile")
    reset_peak()
    times = []
    for _ in range(steps + 1):
        tokens = torch.randn(1, image_tokens, 64, dtype=torch.bfloat16)
        text = torch.randn(1, TEXT_TOKENS, WIDTH["joint_attention_dim"], dtype=torch.bfloat16)
        pooled = torch.randn(1, WIDTH["pooled_projection_dim"], dtype=torch.bfloat16)
        t0 = time.perf_counter()
        out = model(
            hidden_states=tokens, timestep=torch.tensor([0.5], dtype=torch.bfloat16), guidance=torch.tensor([3.5], dtype=torch.bfloat16),
            pooled_projections=pooled, encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids,
        ).sample
        loss = (out.float() - tokens.float()).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak = status_kb("VmHWM")["VmHWM"]
    last_loss = loss.item()
    del out, loss
    settle()
    after = status_kb("VmRSS")["VmRSS"]  # what training left resident: optimizer state and any kernel caches
    return {
        "option": option,
        "quantization": name,
        "backend": backend or "none",
        "gradient_checkpointing": checkpointing,
        "image_tokens": image_tokens,
        "weights_mb": round(base_bytes / MB, 1),
        "weights_bytes": base_bytes,
        "lora_bytes": sum(p.numel() * p.element_size() for p in trained),
        "steady_mb": round((steady["VmRSS"] - start) / 1024, 1),
        "train_peak_mb": round((peak - steady["VmRSS"]) / 1024, 1),
        "total_peak_mb": round((peak - start) / 1024, 1),
        "after_train_mb": round((after - steady["VmRSS"]) / 1024, 1),
        "load_peak_mb": round((loaded["VmHWM"] - start) / 1024, 1),
        "rss_file_mb_before_copy": round(loaded["RssFile"] / 1024, 1),
        "rss_file_mb_steady": round(steady["RssFile"] / 1024, 1),
        "step_s": round(statistics.median(times[1:]), 3),
        "warmup_step_s": round(times[0], 3),
        "load_s": round(load_s, 2),
        "loss": round(last_loss, 5),
        "params_trained": sum(p.numel() for p in trained),
    }


# ---- the run -------------------------------------------------------------------------------------
RATIOS = {"weights_mb": "weights", "steady_mb": "steady", "train_peak_mb": "train_peak", "total_peak_mb": "total_peak", "step_s": "step"}


def table(rows: list[dict]) -> str:
    lines = [
        "| base | grad. ckpt | weights MB | / bf16 | steady RSS MB | / bf16 | training peak above it MB | / bf16 | total peak MB | / bf16 | step s | / bf16 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = lambda key: r.get(f"{RATIOS[key]}_ratio_to_bf16", float("nan"))  # noqa: E731
        lines.append(
            f"| {r['option']} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['weights_mb']:.0f} | {ratio('weights_mb'):.2f} | "
            f"{r['steady_mb']:.0f} | {ratio('steady_mb'):.2f} | {r['train_peak_mb']:.0f} | {ratio('train_peak_mb'):.2f} | "
            f"{r['total_peak_mb']:.0f} | {ratio('total_peak_mb'):.2f} | "
            f"{r['step_s']:.2f} | {ratio('step_s'):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", nargs="+", default=DEFAULT_OPTIONS, choices=list(OPTIONS))
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--long-options", nargs="*", default=LONG_OPTIONS, choices=list(OPTIONS), help="also run these at --long-tokens")
    parser.add_argument("--long-tokens", type=int, default=LONG_TOKENS, help="image tokens of the second grid (a square number)")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--render", action="store_true", help="only rewrite results.md from --out's results.json")
    parser.add_argument("--one", nargs=4, metavar=("FOLDER", "OPTION", "CHECKPOINTING", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # the child process
        folder, option, checkpointing, tokens = args.one
        print("RESULT " + json.dumps(measure(folder, option, checkpointing == "1", args.steps, int(tokens))), flush=True)
        return
    if args.render:
        write_markdown(json.loads((args.out / "results.json").read_text())["rows"], args.out)
        return
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    env = {**os.environ, "OMP_NUM_THREADS": threads, **MALLOC_ENV}
    rows, started = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        save = f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_quant; bench_quant.save_backbone(__import__('pathlib').Path({tmp!r}))"
        subprocess.run([sys.executable, "-c", save], check=True, env=env)
        grid = [(o, IMAGE_TOKENS) for o in args.options] + [(o, args.long_tokens) for o in args.long_options]
        for option, tokens in grid:
            for checkpointing in (False, True):
                cmd = [sys.executable, __file__, "--one", tmp, option, str(int(checkpointing)), str(tokens), "--steps", str(args.steps)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{option} (checkpointing={checkpointing}, {tokens} tokens) failed:\n{proc.stderr[-3000:]}")
                rows.append(json.loads(line[len("RESULT "):]))
                print(rows[-1], flush=True)
    base = {(r["gradient_checkpointing"], r["image_tokens"]): r for r in rows if r["option"] == "bf16"}
    for r in rows:
        b = base.get((r["gradient_checkpointing"], r["image_tokens"]))
        if b:
            for key, label in RATIOS.items():
                r[f"{label}_ratio_to_bf16"] = round(r[key] / b[key], 3) if b[key] else None
    meta = {
        "backbone": {"class": "FluxTransformer2DModel", **WIDTH, **BLOCKS, "image_tokens": [IMAGE_TOKENS, args.long_tokens], "text_tokens": TEXT_TOKENS, "batch": 1},
        "lora": {"rank": 16, "targets": ["to_q", "to_k", "to_v", "to_out.0"]},
        "weights": "exact bytes of the backbone's parameters + buffers after loading (quantized tensors: packed data + scales/statistics)",
        "steady": "VmRSS after load + quantize + LoRA, weights copied out of the file mapping, gc + malloc_trim(0), minus VmRSS after the imports",
        "train_peak": "VmHWM over the steps (reset by /proc/self/clear_refs=5 at the steady point) minus the steady VmRSS",
        "step": f"median of {args.steps} steps after 1 warm-up (forward + backward + AdamW), CPU, OMP_NUM_THREADS={threads}",
        "allocator": f"glibc, {' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())}; one fresh subprocess per row",
        "compute_dtype": "bfloat16",
        "wall_s": round(time.time() - started),
    }
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_markdown(rows, args.out)


def write_markdown(rows: list[dict], out: Path) -> None:
    """``out/results.md``: one table per token count."""
    header = (
        "Flux-width LoRA training (hidden 3072, 1 double + 2 single blocks, batch 1), CPU, one run. Ratios to the bf16 "
        "base with the same checkpointing and tokens. How each column is measured, and what it does not show: README.md.\n"
    )
    sections = [
        f"\n## {n} image + {TEXT_TOKENS} text tokens ({int(n**0.5) * 16} px)\n\n" + table([r for r in rows if r["image_tokens"] == n])
        for n in dict.fromkeys(r["image_tokens"] for r in rows)
    ]
    (out / "results.md").write_text(header + "\n".join(sections) + "\n")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
