"""Export the EMA of any length from a run's post-hoc EMA snapshots (Karras et al. 2024).

    python -m diffusion_lab.posthoc_ema run=outputs/ddpm_digits/runs/<date> sigma_rel=0.1
    python -m diffusion_lab.posthoc_ema -m run=<run dir> sigma_rel=0.03,0.05,0.1,0.2     # a sweep, no retraining
    python -m diffusion_lab.posthoc_ema run=<run dir> sigma_rel=0.05 step=5000      # -> <run dir>/posthoc_ema_0.05_step5000

The run must have trained with ``callbacks.posthoc_ema.every_n_steps=N``. Rebuilds the module from
the run's checkpoint, puts the solved EMA in its trainable weights and writes ``out_dir`` (default
``<run>/posthoc_ema_<sigma_rel>[_step<N>]``; never over an export of another width or step) as the
run's export does (a diffusers pipeline folder; ``adapter=lora``: the LoRA files), with
``posthoc_ema.json`` (coefficients per snapshot and the residual of the profile fit) beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

import diffusion_lab  # noqa: F401
from diffusion_lab.callbacks.posthoc_ema import (
    find_snapshots,
    load_weights,
    reconstruct,
)
from diffusion_lab.export import export
from diffusion_lab.inference.checkpoints import load_module
from diffusion_lab.utils.cli import explain_unknown_keys, friendly_errors
from diffusion_lab.utils.config_path import CONFIG_PATH
from diffusion_lab.utils.errors import ConfigError


def run(cfg: DictConfig) -> Path:
    snapshots = find_snapshots(cfg.snapshots)
    if not snapshots:
        raise ConfigError(f"no post-hoc EMA snapshots in {cfg.snapshots}: train the run with callbacks.posthoc_ema.every_n_steps=N (N > 0), or point snapshots= at its callbacks.posthoc_ema.dirpath.")
    weights, report = reconstruct(snapshots, float(cfg.sigma_rel), cfg.step)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg.run, cfg.sigma_rel, cfg.step)
    check_out_dir(out_dir, report)
    module = load_module(cfg.ckpt_path, use_ema=False, trust=cfg.trust_checkpoint)
    load_weights(module, weights)
    export(module, out_dir)
    (out_dir / "posthoc_ema.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_dir} (sigma_rel {cfg.sigma_rel}, step {report['step']}, {len(report['snapshots'])} snapshots, profile fit residual {report['residual']:.2e})")
    return out_dir


def default_out_dir(run_dir: str, sigma_rel: float, step: int | None) -> Path:
    """``<run>/posthoc_ema_<sigma_rel>``, with ``_step<N>`` when an earlier step was asked for, so
    exports of different steps never share a folder."""
    return Path(run_dir) / (f"posthoc_ema_{sigma_rel}" + ("" if step is None else f"_step{int(step)}"))


def check_out_dir(out_dir: Path, report: dict) -> None:
    """``ConfigError`` when ``out_dir`` holds the export of another width or step (the same one is
    rewritten: running a command twice gives the same folder)."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    try:
        old = json.loads((out_dir / "posthoc_ema.json").read_text())
        same = (float(old["sigma_rel"]), int(old["step"])) == (float(report["sigma_rel"]), int(report["step"]))
        held = f"the post-hoc EMA of sigma_rel {old['sigma_rel']} at step {old['step']}"
    except (OSError, ValueError, KeyError, TypeError):
        same, held = False, "files that are not this post-hoc EMA export"
    if not same:
        raise ConfigError(
            f"out_dir={out_dir} already holds {held}; this call would replace it with sigma_rel {report['sigma_rel']} "
            f"at step {report['step']}. Pass another out_dir=, or delete that folder first."
        )


@hydra.main(config_path=CONFIG_PATH, config_name="posthoc_ema", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with friendly_errors():
        run(cfg)


if __name__ == "__main__":
    with explain_unknown_keys("posthoc_ema"):
        main()
