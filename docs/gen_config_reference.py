"""Write docs/reference/configuration.md from conf/: every config group, every option, its header comment.

    python docs/gen_config_reference.py           # rewrites docs/reference/configuration.md
    python docs/gen_config_reference.py --check   # exit 1 if the page is stale or an option has no header comment

An option's description is the first sentence of the comment block at the top of its YAML file (`# @package`
lines skipped). tests/test_docs.py fails when the committed page differs from what this writes, or when a
file has no such comment. Folders named with a leading underscore (`_shared`) hold partial configs that options
pull in: they are not options and are left out.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PAGE = ROOT / "docs" / "reference" / "configuration.md"
MAX_CHARS = 220

# One line per group: what the group is. A group missing here is described as "(no description)" and the test fails.
GROUPS = {
    "adapter": "which weights train: all of them (`none`), a LoRA or one of its variants, or textual-inversion tokens",
    "backbone": "the denoising network: a UNet or a transformer, built here or read from a pipeline",
    "callbacks": "what runs beside training: EMA, sample grids, checkpoints, export, guards",
    "conditioning": "what a pixel model is conditioned on (nothing, or class labels)",
    "controlnet": "a ControlNet trained beside a frozen backbone, or none",
    "data": "where training images (and captions, pairs, masks) come from",
    "debug": "quick checks of a config (Lightning's fast_dev_run)",
    "experiment": "a recipe: several groups and values set at once (`# @package _global_`)",
    "features": "the feature network of FID / KID / IS (`python -m diffusion_lab.evaluate`)",
    "hparams_search": "a hyperparameter search (Optuna) over a multirun",
    "hydra": "Hydra's own settings: run folders, logging",
    "hydra/launcher": "how a multirun's jobs are started (SLURM)",
    "logger": "where metrics go: W&B (offline without a key), CSV, or nowhere",
    "lr_scheduler": "the learning-rate schedule (selected into `model.lr_scheduler`)",
    "method": "what a training step optimises: the process's loss, DPO, GRPO or distillation",
    "model": "the LightningModule: pixel, autoencoder or a text-to-image family",
    "optimizer": "the optimizer (selected into `model.optimizer`)",
    "paths": "where runs, data and caches are written",
    "plan/architecture": "real-size architectures for the memory plan (`python -m diffusion_lab.plan`)",
    "process": "the diffusion process of training: how data is noised and what the network learns",
    "quantization": "a quantized frozen base for QLoRA",
    "recipe": "multi-stage sampling recipes (`python -m diffusion_lab.sample`)",
    "reward": "the reward GRPO maximises",
    "sampler": "the inference scheduler: previews, exports, `diffusion_lab.sample`",
    "sweep": "named multirun grids",
    "text_encoder": "the text conditioner of a latent model (frozen or trained)",
    "trainer": "the Lightning Trainer: device, strategy (DDP, FSDP2), precision",
    "vae": "the codec between images and what the backbone sees (the identity for pixel models)",
}


def header(path: Path) -> str | None:
    """The first sentence of the comment block that opens ``path`` (``# @package`` lines skipped), or None."""
    lines = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# @package") or (not lines and not stripped):
            continue
        if not stripped.startswith("#"):
            break
        text = stripped.lstrip("#").strip()
        if not text:
            if lines:
                break
            continue
        lines.append(text)
    if not lines:
        return None
    text = " ".join(lines)
    match = re.search(r"(?<=[.!?])\s+(?=[A-Z(`])", text)
    sentence = text[: match.start()] if match else text
    if len(sentence) > MAX_CHARS:
        sentence = sentence[:MAX_CHARS].rsplit(" ", 1)[0] + " ..."
    return sentence.replace("|", "\\|")


def groups() -> dict[str, list[Path]]:
    """Every config group (nested ones as ``a/b``) and its options, sorted; ``_private`` folders left out."""
    found: dict[str, list[Path]] = {}
    for path in sorted(CONF.rglob("*.yaml")):
        rel = path.relative_to(CONF)
        if len(rel.parts) == 1 or any(part.startswith("_") for part in rel.parts[:-1]):
            continue
        found.setdefault("/".join(rel.parts[:-1]), []).append(path)
    return found


def missing_headers() -> list[str]:
    """conf/ files (options and the top-level configs) that open with no comment."""
    paths = [p for p in sorted(CONF.rglob("*.yaml")) if not any(part.startswith("_") for part in p.relative_to(CONF).parts[:-1])]
    return [p.relative_to(ROOT).as_posix() for p in paths if header(p) is None]


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python docs/gen_config_reference.py` from conf/: edit the YAML files' header comments, not this page. -->",
        "",
        "Every part you can swap is a config group under `conf/`; pick an option with `group=option` on the command line",
        "(`process=edm`, `trainer=ddp`), set a value with `key=value` (`data.batch_size=64`). Each option below is described",
        "by the comment that opens its file; read the file for every key it sets. Print a composed config without running",
        "anything with `python -m diffusion_lab.train <overrides> --cfg job`.",
        "",
        "## Top-level configs",
        "",
        "| config | entry point | what it is |",
        "|---|---|---|",
    ]
    for path in sorted(CONF.glob("*.yaml")):
        out.append(f"| `{path.name}` | `python -m diffusion_lab.{path.stem}` | {header(path) or '(no header comment)'} |")
    for group, paths in groups().items():
        out += ["", f"## `{group}`", "", GROUPS.get(group, "(no description)") + ".", "", "| option | what it is |", "|---|---|"]
        for path in paths:
            out.append(f"| `{group}={path.stem}` | {header(path) or '(no header comment)'} |")
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the page is stale or a header is missing")
    args = parser.parse_args()
    text = render()
    if args.check:
        problems = [f"{p}: no header comment" for p in missing_headers()]
        if not PAGE.is_file() or PAGE.read_text() != text:
            problems.append(f"{PAGE.relative_to(ROOT)} is stale: run python docs/gen_config_reference.py")
        print("\n".join(problems) or "configuration reference is current")
        return 1 if problems else 0
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)} ({len(groups())} groups)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
