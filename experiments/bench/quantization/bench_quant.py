"""Peak memory and step time of LoRA training on a Flux-width transformer with a bf16 / int8 / nf4 / float8
frozen base, gradient checkpointing off and on (CPU, one run; issue #24).

    OMP_NUM_THREADS=1 python experiments/bench/quantization/bench_quant.py      # writes results.json + results.md here

The backbone is a ``FluxTransformer2DModel`` of FLUX.1's real width (hidden 3072 = 24 heads x 128, T5 width
4096, CLIP pooled 768) with 1 double- and 2 single-stream blocks (FLUX.1-dev has 19 + 38), saved once in bf16
with ``save_pretrained`` and loaded by the library's own path (``components/pretrained.from_pretrained`` with
what ``quantization=<option>`` gives it), LoRA rank 16 on the attention projections (``components/adapters``),
AdamW on the LoRA. Every configuration runs in a fresh subprocess; memory is the process's peak resident set
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) minus its resident set after the imports, so it counts the
loaded weights, the quantization pass, activations, gradients and optimizer state (on CPU there is no separate
device allocator; the quantizers' transient fp buffers while loading count too). Step time is the median of
the timed steps after one warm-up step. Absolute CPU times say nothing about a GPU (the bitsandbytes and
torchao CPU kernels dequantize in Python-level ops); the memory ratios carry over in kind.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OPTIONS = {"bf16": "none", "int8": "int8", "int8_torchao": "int8_torchao", "nf4": "nf4", "float8": "float8"}
WIDTH = dict(num_attention_heads=24, attention_head_dim=128, joint_attention_dim=4096, pooled_projection_dim=768)
BLOCKS = dict(num_layers=1, num_single_layers=2)
IMAGE_TOKENS, TEXT_TOKENS = 64, 32  # a 16x16 latent (128 px) packed 2x2, and a short T5 context


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def save_backbone(folder: Path) -> None:
    """A random Flux-width transformer saved in bf16 as ``folder/transformer``."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(in_channels=64, guidance_embeds=True, axes_dims_rope=(16, 56, 56), **WIDTH, **BLOCKS)
    model.to(torch.bfloat16).save_pretrained(folder / "transformer")


def measure(folder: str, option: str, checkpointing: bool, steps: int) -> dict:
    """One configuration, in this (fresh) process."""
    import torch
    from diffusers import FluxPipeline

    from diffusion_lab.components.adapters import add_lora, lora_config
    from diffusion_lab.components.pretrained import from_pretrained
    from diffusion_lab.components.quantization import load_kwargs

    torch.manual_seed(0)
    start = rss_mb()
    name = OPTIONS[option]
    backend = {"none": None, "nf4": "bitsandbytes", "int8": "bitsandbytes", "int8_torchao": "torchao", "float8": "torchao"}[name]
    weights = {"none": None, "nf4": "nf4", "int8": "int8", "int8_torchao": "int8", "float8": "float8"}[name]
    quantization = load_kwargs("diffusers", backend, weights, dtype="bfloat16", name=name)
    model = from_pretrained("diffusers.FluxTransformer2DModel", folder, subfolder="transformer", dtype=None if quantization else "bfloat16", quantization=quantization)
    add_lora(model, lora_config(rank=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    loaded = rss_mb()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    h = w = int(IMAGE_TOKENS**0.5) * 2  # latent side before 2x2 packing
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.bfloat16)
    txt_ids = torch.zeros(TEXT_TOKENS, 3, dtype=torch.bfloat16)
    times = []
    for _ in range(steps + 1):
        tokens = torch.randn(1, IMAGE_TOKENS, 64, dtype=torch.bfloat16)
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
    return {
        "option": option,
        "gradient_checkpointing": checkpointing,
        "peak_mb": round(rss_mb() - start, 1),
        "after_load_mb": round(loaded - start, 1),
        "step_s": round(statistics.median(times[1:]), 3),
        "loss": round(float(loss), 5),
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trained": sum(p.numel() for p in trained),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", nargs="+", default=list(OPTIONS))
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--one", nargs=3, metavar=("FOLDER", "OPTION", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # the child process
        folder, option, checkpointing = args.one
        print("RESULT " + json.dumps(measure(folder, option, checkpointing == "1", args.steps)), flush=True)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_quant; bench_quant.save_backbone(__import__('pathlib').Path({tmp!r}))"], check=True)
        for option in args.options:
            for checkpointing in (False, True):
                cmd = [sys.executable, __file__, "--one", tmp, option, str(int(checkpointing)), "--steps", str(args.steps)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
                line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{option} (checkpointing={checkpointing}) failed:\n{proc.stderr[-3000:]}")
                rows.append(json.loads(line[len("RESULT "):]))
                print(rows[-1], flush=True)
    base = {r["gradient_checkpointing"]: r for r in rows if r["option"] == "bf16"}
    for r in rows:
        b = base.get(r["gradient_checkpointing"])
        if b:
            r["peak_ratio_to_bf16"] = round(r["peak_mb"] / b["peak_mb"], 3)
            r["step_ratio_to_bf16"] = round(r["step_s"] / b["step_s"], 3)
    meta = {
        "backbone": {"class": "FluxTransformer2DModel", **WIDTH, **BLOCKS, "image_tokens": IMAGE_TOKENS, "text_tokens": TEXT_TOKENS, "batch": 1},
        "lora": {"rank": 16, "targets": ["to_q", "to_k", "to_v", "to_out.0"]},
        "memory": "peak RSS (getrusage ru_maxrss) minus RSS after imports, per fresh subprocess",
        "step": f"median of {args.steps} steps after 1 warm-up (forward + backward + AdamW), CPU, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}",
        "compute_dtype": "bfloat16",
    }
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "| base | grad. ckpt | peak MB | peak / bf16 | after load MB | step s | step / bf16 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['option']} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['peak_mb']:.0f} | {r.get('peak_ratio_to_bf16', float('nan')):.2f} | "
            f"{r['after_load_mb']:.0f} | {r['step_s']:.2f} | {r.get('step_ratio_to_bf16', float('nan')):.2f} |"
        )
    header = f"Flux-width LoRA training, CPU, one run ({meta['memory']}; {meta['step']}). Ratios to the bf16 base with the same checkpointing.\n\n"
    (args.out / "results.md").write_text(header + "\n".join(lines) + "\n")
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
