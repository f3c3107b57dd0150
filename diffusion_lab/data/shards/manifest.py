"""A shard set's manifest (``shards.json``: what was written, from which data config and model), and
the checks that encoded shards fit the model that trains on them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import torch

from diffusion_lab.data.shards.store import S3_ENV, LocalRoot, S3Root, ShardRoot, Unreachable, is_remote
from diffusion_lab.utils.errors import ConfigError, DataError

MANIFEST = "shards.json"
FORMAT_VERSION = 1
Kind = Literal["pixels", "latents"]  # what the samples hold: PNG images, or VAE posteriors (+ text states)

_PEEKED: dict[tuple, dict | None] = {}


def peek_manifest(root: str) -> dict | None:
    """The manifest of the object-store shard set at ``root`` for config resolution
    (``${shard_info:...}``, read at every access of ``data.resolution``): read once per process and
    ``AWS_*`` environment; None when it cannot be read (the data module then says why)."""
    key = (str(root), *(os.environ.get(v) for v in S3_ENV))
    if key not in _PEEKED:
        try:
            _PEEKED[key] = read_manifest(root)
        except Unreachable:
            _PEEKED[key] = None  # finding out took seconds: do not ask again at every access
        except (ConfigError, DataError):
            return None
    return _PEEKED[key]


def count_items(store: ShardRoot, split_dir: str) -> int:
    """Items in the litdata folder ``split_dir`` of ``store`` (its ``index.json``)."""
    index = json.loads(store.read_text(split_dir, "index.json"))
    return sum(chunk["chunk_size"] for chunk in index["chunks"])


def forget_peeked(root: str) -> None:
    """Drop what ``peek_manifest`` read of ``root`` (a prepare has just written it)."""
    for key in [k for k in _PEEKED if k[0] == str(root)]:
        del _PEEKED[key]


def fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and values): which frozen VAE or text
    encoder the stored latents / states came from."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_manifest(root: str | Path | ShardRoot) -> dict:
    """The manifest of the shard set at ``root`` (a folder or ``s3://bucket/prefix``); a
    ``DataError`` that says what ``root`` is instead when it is not a complete shard set."""
    if isinstance(root, S3Root) or (not isinstance(root, LocalRoot) and is_remote(root)):
        return _read_remote_manifest(root if isinstance(root, S3Root) else S3Root(str(root)))
    root = root.path if isinstance(root, LocalRoot) else Path(root).expanduser()
    path = root / MANIFEST
    if not root.is_dir():
        unfinished = sorted(root.parent.glob(f".{root.name}.tmp-*")) if root.parent.is_dir() else []
        hint = f" An unfinished prepare left {unfinished[0]} (prepare was interrupted: run it again)." if unfinished else ""
        raise DataError(f"data.root={str(root)!r} does not exist.{hint} Write a shard set there with python -m diffusion_lab.prepare data=<source> out_dir={root}.")
    if not path.is_file():
        images = any(p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") for p in root.iterdir())
        hint = " It holds images: train on them with data=image_folder, or write shards from them first." if images else ""
        raise DataError(
            f"data.root={str(root)!r} is not a shard set (no {MANIFEST}, which python -m diffusion_lab.prepare writes "
            f"last, once every shard is complete).{hint} Run: python -m diffusion_lab.prepare data=image_folder "
            f"data.root=<images> out_dir={root}."
        )
    return _checked_manifest(path.read_text(), str(path), LocalRoot(root))


def _read_remote_manifest(store: S3Root) -> dict:
    raw = store.read_bytes(MANIFEST)
    if raw is None:
        if not store.has_objects():
            raise DataError(
                f"{store.key}={store.url} does not exist (no object under that prefix of bucket {store.bucket!r} at "
                f"{store.endpoint}). Write a shard set there with python -m diffusion_lab.prepare data=<source> out_dir={store.url}."
            )
        raise DataError(
            f"{store.key}={store.url} is not a complete shard set: it holds objects but no {MANIFEST}, which python -m "
            f"diffusion_lab.prepare uploads last, once every shard is up (an interrupted prepare?). Write it again with "
            f"prepare.overwrite=true."
        )
    return _checked_manifest(raw.decode(errors="replace"), store.join(MANIFEST), store)


def _checked_manifest(text: str, path: str, store: ShardRoot) -> dict:
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise DataError(f"{path} is not JSON ({e}); the shard set is damaged: write it again with python -m diffusion_lab.prepare.") from e
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("kind") not in ("pixels", "latents"):
        raise DataError(f"{path} is not a diffusion_lab shard manifest of format {FORMAT_VERSION}; write the shards again with this version's python -m diffusion_lab.prepare.")
    if not split_dirs(store, "train", manifest):
        raise DataError(f"{store.join('train')} has no litdata index.json: the shard set is incomplete; write it again with python -m diffusion_lab.prepare.")
    return manifest


def split_dirs(store: ShardRoot, split: str, manifest: dict) -> list[tuple[int, str]]:
    """``(bucket id, litdata folder relative to the root)`` of each part of a split: ``[(0, split)]``,
    or for bucketed shards one folder ``<split>/<h>x<w>`` per bucket of ``manifest["buckets"]`` that has items."""
    if not manifest.get("buckets"):
        return [(0, split)] if store.is_file(split, "index.json") else []
    parts = [(b, f"{split}/{h}x{w}") for b, (h, w) in enumerate(manifest["buckets"])]
    return [(b, d) for b, d in parts if store.is_file(d, "index.json")]


def model_identity(module: torch.nn.Module, text_states: bool) -> dict:
    """What encoded shards depend on: the VAE's fingerprint and, when text states are stored,
    the text conditioner's (``model_identity`` of the training module must match)."""
    return {
        "family": getattr(module, "family", type(module).__name__),
        "module": f"{type(module).__module__}.{type(module).__qualname__}",
        "vae": fingerprint(module.codec),
        "text_encoder": fingerprint(module.conditioner) if text_states else None,
        "text_keys": list(module.text_keys) if text_states else [],
    }


def check_shards_fit_model(manifest: dict, module: torch.nn.Module, root: str) -> None:
    """``ConfigError`` when encoded shards were written for another model than ``module``."""
    from diffusion_lab.components.vae import IdentityCodec

    if manifest["kind"] != "latents":
        return
    stored = manifest["model"]
    codec = getattr(module, "codec", None)
    if codec is None or isinstance(codec, IdentityCodec):
        raise ConfigError(
            f"data.root={root} holds VAE latents (prepared with {_prepared_with(stored)}) but this model has no VAE "
            f"({type(module).__name__}); train with the model it was prepared with, or prepare pixel shards (prepare.encode=false)."
        )
    if fingerprint(codec) != stored["vae"]:
        raise ConfigError(
            f"data.root={root} was encoded with another VAE (shards.json: vae {stored['vae'][:12]}, config {stored.get('vae_config')}) "
            f"than this run's vae= ({fingerprint(codec)[:12]}); its latents would be wrong for this model. Use the model "
            f"config it was prepared with, or prepare again: python -m diffusion_lab.prepare prepare.encode=true model=... out_dir=<new>."
        )
    if stored["text_keys"]:
        conditioner = module.conditioner
        if not conditioner.frozen:
            raise ConfigError(
                f"data.root={root} stores frozen text-encoder states, but this run trains the text encoder "
                f"(text_encoder.trainable / adapter text LoRA), so they would be stale. Prepare with prepare.text_states=false "
                f"(captions only) or keep the text encoder frozen."
            )
        if fingerprint(conditioner) != stored["text_encoder"] or list(module.text_keys) != stored["text_keys"]:
            raise ConfigError(
                f"data.root={root} stores text states of another text encoder (shards.json: text encoder "
                f"{stored['text_encoder'][:12]}, states {stored['text_keys']}) than this run's text_encoder= "
                f"({fingerprint(conditioner)[:12]}, states {list(module.text_keys)}); they would be wrong for this model. "
                f"Train with the model it was prepared with ({_prepared_with(stored)}), or prepare again with this one: "
                f"python -m diffusion_lab.prepare prepare.encode=true model=... out_dir=<new> (prepare.text_states=false: captions only)."
            )


def _prepared_with(stored: dict) -> str:
    """The model overrides encoded shards were prepared with (``manifest["model"]``), for messages."""
    overrides = stored.get("train_overrides")
    if overrides:
        return " ".join(overrides)
    return f"model family {stored['family']}" + (f", model.pretrained={stored['pretrained']}" if stored.get("pretrained") else "")
