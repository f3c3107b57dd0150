"""LoRA <-> full fine-tune: fuse LoRA files into a base pipeline, or extract a LoRA from a full fine-tune.

    python -m diffusion_lab.lora merge BASE OUT --lora outputs/run_a/export:0.8 --lora style.safetensors
    python -m diffusion_lab.lora merge BASE OUT --lora run/lora --single-file OUT.safetensors   # + A1111 / ComfyUI file
    python -m diffusion_lab.lora extract BASE TUNED OUT --rank 16        # or --energy 0.9

BASE / TUNED: pipeline folders (``save_pretrained``, as a full fine-tune exports) or hub ids; a LoRA is
a ``.safetensors`` file or a folder holding ``pytorch_lora_weights.safetensors`` (diffusers' layout, or
a kohya / A1111 one that diffusers' ``load_lora_weights`` converts), with an optional ``:WEIGHT``.
``merge`` writes a full pipeline folder (and with ``--single-file`` the same weights as one original-layout
``.safetensors``, ``export/single_file.py``: SD 1.x, SDXL; SD3's, FLUX.1's transformer); ``extract`` writes a LoRA folder that
``pipe.load_lora_weights(OUT)`` reads. The work is done in ``diffusion_lab/export/lora_tools.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from diffusion_lab.utils.errors import ConfigError


def _lora_arg(text: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:WEIGHT`` -> (path, weight); a ``:`` not followed by a number is part of the path."""
    path, _, weight = text.rpartition(":")
    try:
        return (path, float(weight)) if path else (text, 1.0)
    except ValueError:
        return text, 1.0


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="tool", required=True)
    m = sub.add_parser("merge", help="fuse LoRA files (with weights) into the base; write a full pipeline folder")
    m.add_argument("base", help="base pipeline folder or hub id")
    m.add_argument("out", help="pipeline folder to write (replaced atomically)")
    m.add_argument("--lora", action="append", required=True, type=_lora_arg, metavar="PATH[:WEIGHT]", help="a LoRA file or folder, weight 1 by default; repeat to fuse several")
    m.add_argument("--single-file", metavar="FILE", help="also write the merged model as one .safetensors in the original (A1111 / ComfyUI) layout")
    e = sub.add_parser("extract", help="a LoRA of the backbone from a full fine-tune (SVD of the weight difference per layer)")
    e.add_argument("base", help="the base pipeline the fine-tune started from")
    e.add_argument("tuned", help="the fine-tuned pipeline folder")
    e.add_argument("out", help="LoRA folder to write (replaced atomically)")
    size = e.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="rank of every layer's LoRA")
    size.add_argument("--energy", type=float, help="per layer the smallest rank keeping this share of sum(S^2), e.g. 0.9 (1.0: full rank)")
    a = p.parse_args(argv)

    from diffusion_lab.export import lora_tools

    try:
        if a.tool == "merge":
            out = lora_tools.merge(a.base, a.lora, a.out)
            print(f"fused {len(a.lora)} LoRA file(s) into {a.base}: wrote {out}")
            if a.single_file:
                from diffusion_lab.export import single_file

                pipe = lora_tools.load_pipeline(str(out))
                written = single_file.save(pipe, a.single_file)
                print(f"wrote {written}" if written else f"no single file: {type(pipe).__name__} has no single-file layout here ({', '.join(single_file.LAYOUTS)})")
        else:
            s = lora_tools.extract(a.base, a.tuned, a.out, rank=a.rank, energy=a.energy)
            ranks = sorted(s["ranks"].values())
            print(
                f"wrote {s['file']}: {s['layers']} layers, rank {ranks[0]}..{ranks[-1]}; these Linear / 1x1 conv layers hold "
                f"{100 * s['covered']:.1f}% of the squared weight difference (the rest: 3x3 convs, norms, biases, embeddings)"
            )
    except ConfigError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
