"""Readable command-line errors for the entry points: our errors as one paragraph instead of a
traceback, and for a key Hydra refuses, the closest keys that exist."""

from __future__ import annotations

import difflib
import logging
import sys
from contextlib import contextmanager

from omegaconf import OmegaConf

from diffusion_lab.utils.errors import DiffusionLabError
from diffusion_lab.utils.hydra_context import _cli_overrides, _hydra_cfg, _is_multirun

log = logging.getLogger(__name__)

# keys that earlier versions had, and what replaced them (shown instead of a close-match guess)
RENAMED = {
    "scheduler": "scheduler= was split in two: process= is what training does (vp, vp_sd, vp_pretrained, "
    "flow_matching, edm; e.g. process.prediction_type=v_prediction, process.scheduler.beta_schedule=...) and "
    "sampler= how samples are drawn (default, ddpm, ddim, dpmpp, euler, heun, pndm, unipc, flow_euler, edm_euler, edm_dpmpp).",
}
# renamed keys and groups (old prefix -> new): the UNet group became the backbone group (it holds DiT, SD3,
# FLUX, ... transformers too) and the family's own options moved under model.family
RENAMED_PREFIXES = {
    "model/unet": "backbone",
    "model.unet": "backbone",
    "model.compile_unet": "model.compile_backbone",
    "model.unet_lora": "model.backbone_lora",
    "model.unet_base_dtype": "model.backbone_base_dtype",
    "adapter.unet": "adapter.backbone",
    "model.guidance": "model.family.guidance",
    "model.sample_guidance": "model.family.sample_guidance",
    "model.force_zeros_for_empty_prompt": "model.family.force_zeros_for_empty_prompt",
    "model.class_steps": "data.class_steps",  # DreamBooth's class images are the data's (callbacks/dreambooth.py)
    "model.class_guidance": "data.class_guidance",
    "model.class_batch_size": "data.class_batch_size",
    "model.class_seed": "data.class_seed",
    "model.controlnet": "controlnet",  # a part of any family with one: controlnet=from_backbone controlnet.pretrained=...
    "model.conditioning_scale": "controlnet.conditioning_scale",
    "model.preview_images": "controlnet.preview_images",
    "model.control": "data.control",
    "model.placeholder_token": "adapter.placeholder_token",  # textual inversion is an adapter: adapter=textual_inversion
    "model.initializer_token": "adapter.initializer_token",
    "model.num_vectors": "adapter.num_vectors",
}


# options that became a combination of parts
RENAMED_OPTIONS = {"model=latent_controlnet": "model=latent_sd controlnet=from_backbone (ControlNet is a part of any family with one)"}


def renamed(key: str) -> str | None:
    """The new spelling of an old key or group (``model/unet`` -> ``backbone``), else None."""
    bare = key.lstrip("+~")
    for old, new in RENAMED_PREFIXES.items():
        if bare == old or bare.startswith(old + "."):
            return new + bare[len(old):]
    return None


def _leaf_paths(tree: dict, prefix: str = "") -> list[str]:
    """Every key of a nested dict as a dotted path, sections and values alike."""
    out = []
    for k, v in tree.items():
        out.append(prefix + str(k))
        if isinstance(v, dict):
            out += _leaf_paths(v, prefix + str(k) + ".")
    return out


def _closest(parts: list[str], depth: int, names: list[str], paths: list[str]) -> list[str]:
    """Keys the user probably meant: close names in the deepest section that exists, or else keys
    anywhere whose last name is close to the typed last name (``max_stepz`` -> ``trainer.max_steps``)."""
    prefix = ".".join(parts[:depth] + [""])
    here = [prefix + c for c in difflib.get_close_matches(parts[depth], names, n=3, cutoff=0.6)]
    if here:
        return here
    tails: dict[str, list[str]] = {}
    for p in paths:
        tails.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    return [p for name in difflib.get_close_matches(parts[-1], list(tails), n=3, cutoff=0.75) for p in tails[name]][:3]


def unknown_key_hints(overrides: list[str], config_name: str) -> list[str]:
    """For each ``a.b.c=value`` (or top-level ``key=value``) override whose key is not in the config
    (with the command line's group choices applied): the deepest section that exists, the closest
    keys there and anywhere in the config, and the section's keys."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from diffusion_lab.utils.config_path import conf_dir

    conf = conf_dir()
    hints = [f"{o.split('=', 1)[0]} was renamed: write {renamed(o.split('=', 1)[0])}={o.split('=', 1)[1]}." for o in overrides if "=" in o and renamed(o.split("=", 1)[0])]
    hints += [f"{o} was replaced: write {RENAMED_OPTIONS[o]}." for o in overrides if o in RENAMED_OPTIONS]
    overrides = [o for o in overrides if o not in RENAMED_OPTIONS]
    overrides = [o for o in overrides if "=" not in o or not renamed(o.split("=", 1)[0])]
    plain = [o for o in overrides if "=" in o and not o.startswith(("+", "~", "hydra."))]
    # group choices: data=hf, backbone=tiny, optimizer@model.optimizer=adamw_8bit (group@package)
    groups = [o for o in plain if (conf / o.split("=", 1)[0].split("@")[0]).is_dir()]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=groups)
    except Exception:  # the group choices themselves fail (or are a sweep): Hydra's message says why
        return hints
    tree = OmegaConf.to_container(cfg, resolve=False)  # keys only: ${hydra:...} cannot resolve here
    paths = _leaf_paths(tree)
    for o in plain:
        key = o.split("=", 1)[0]
        if o in groups:
            continue
        parts, node, depth = key.split("."), tree, 0
        if parts[0] in RENAMED and parts[0] not in tree:
            hints.append(f"{key}: {RENAMED[parts[0]]}")
            continue
        while depth < len(parts) and isinstance(node, dict) and parts[depth] in node:
            node, depth = node[parts[depth]], depth + 1
        if depth == len(parts):  # a key that exists
            continue
        section = ".".join(parts[:depth]) or "the top level"
        if not isinstance(node, dict):
            hints.append(f"{key}: {section} is a value, not a section.")
            continue
        names = [str(k) for k in node]
        close = _closest(parts, depth, names, paths)
        guess = f" Did you mean {' or '.join(close)}?" if close else ""
        hints.append(f"{key} is not a config key ({parts[depth]!r} is not in {section}).{guess} Keys in {section}: {', '.join(names)}.")
    return hints


@contextmanager
def explain_unknown_keys(config_name: str):
    """Around a ``@hydra.main`` entry point: when Hydra refuses the command line, add which
    override keys do not exist and the closest existing ones (a typo, not a missing ``+``)."""
    try:
        yield
    except SystemExit as e:
        if e.code == 1:
            hints = unknown_key_hints(_cli_overrides(sys.argv[1:]), config_name)
            if hints:
                print("\nerror: " + " ".join(hints) + " (Prefix a new key with + only to add a key on purpose.)\n", file=sys.stderr)
        raise


@contextmanager
def friendly_errors():
    """Turn our user-facing errors into one readable paragraph instead of a traceback. In a
    multirun the error is logged and re-raised, so Hydra marks that job failed and goes on."""
    try:
        yield
    except Exception as raised:
        e = raised  # hydra.utils.instantiate wraps what a constructor raises: find ours
        while e is not None and not isinstance(e, DiffusionLabError):
            e = e.__cause__
        if e is None:
            raise
        if _is_multirun(_hydra_cfg()):
            log.error(f"job failed: {e}")
            raise
        print(f"\nerror: {e}\n", file=sys.stderr)
        raise SystemExit(2) from None
