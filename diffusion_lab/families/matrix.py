"""The table of (family x method): which fine-tuning method each model family takes, and why not.

    python -m diffusion_lab.families.matrix          # the Markdown table README shows

A family is a ``model=latent_*`` option whose ``family:`` is a ``Family`` (``families/base.py``); a
method is a part that composes with it (the overrides below). ``Family.supports`` answers for each
pair, the same answer ``LatentDiffusion`` gives as a ConfigError before training; ``tests/test_matrix.py``
trains every supported pair for two steps and loads what it exports.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from omegaconf import OmegaConf

from diffusion_lab.utils.config_path import conf_dir

# method -> (what it is, the command-line overrides that select it, what the run exports)
METHODS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "full": ("full fine-tune", ("adapter=none",), "<run>/pipeline"),
    "lora": ("LoRA", ("adapter=lora",), "<run>/lora"),
    "dora": ("DoRA", ("adapter=dora",), "<run>/dora"),
    "lokr": ("LoKr / LoHa", ("adapter=lokr",), "<run>/lokr (peft folders)"),
    "dreambooth": ("DreamBooth (prior preservation)", ("data=dreambooth_digits",), "<run>/pipeline"),
    "textual_inversion": ("textual inversion", ("adapter=textual_inversion",), "<run>/textual_inversion"),
    "controlnet": ("ControlNet", ("controlnet=from_backbone", "++data.control=edges", "callbacks.export.dirpath=${paths.output_dir}/controlnet"), "<run>/controlnet"),
    "edit": ("edit pairs (source -> target)", ("data=image_folder", "data.paired_images={source_image: source_pixel_values}"), "<run>/pipeline"),
}


def families() -> dict[str, type]:
    """``model=`` option -> its ``Family`` class, for every conf/model file that names one."""
    out = {}
    for path in sorted(Path(conf_dir(), "model").glob("latent_*.yaml")):
        target = OmegaConf.load(path).get("family", {}).get("_target_")
        if target:
            module, name = target.rsplit(".", 1)
            out[path.stem] = getattr(importlib.import_module(module), name)
    return out


def support(family: type, method: str) -> str | None:
    """None when ``family`` takes ``method``, else why not (``Family.supports``, which reads class attributes only)."""
    return family.supports(family.__new__(family), method)


def table() -> str:
    """The Markdown table: one row per family, one column per method; a refusal shows its reason as a footnote."""
    methods = list(METHODS)
    header = "| model | " + " | ".join(METHODS[m][0] for m in methods) + " |"
    rows, notes = [header, "|" + "---|" * (len(methods) + 1)], []
    for option, cls in families().items():
        cells = []
        for m in methods:
            reason = support(cls, m)
            if reason is None:
                cells.append("yes")
            else:
                if reason not in notes:
                    notes.append(reason)
                cells.append(f"no [{notes.index(reason) + 1}]")
        rows.append(f"| `{option}` | " + " | ".join(cells) + " |")
    return "\n".join(rows + [""] + [f"[{i}] {note}" for i, note in enumerate(notes, 1)]) + "\n"


if __name__ == "__main__":
    print(table(), end="")
