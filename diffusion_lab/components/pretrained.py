"""Load one component of a diffusers pipeline folder (unet/ vae/ text_encoder/ tokenizer/
scheduler/) from ``model.pretrained``: a local folder or a hub id, honouring ``local_files_only``.

Every failure becomes a ``ConfigError`` that says which key to change: a missing folder, a folder
without the subfolder, or a hub id that cannot be fetched (offline).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from hydra.utils import get_class

from diffusion_lab.components.schedulers import build_scheduler
from diffusion_lab.utils.errors import ConfigError

Dtype = Literal["float32", "bfloat16", "float16"]

# the group override that builds each component without model.pretrained
_ALTERNATIVE = {
    "unet": "backbone=sd_tiny",
    "vae": "vae=tiny",
    "text_encoder": "text_encoder=tiny",
    "tokenizer": "text_encoder=tiny",
    "scheduler": "scheduler=ddpm",
}
TINY_HINT = "python -m diffusion_lab.tiny_sd outputs/tiny_sd builds a tiny random one offline"
SDXL_ONLY = ("text_encoder_2", "tokenizer_2")  # what an SDXL base folder has and an SD 1.x/2.x one lacks


def torch_dtype(name: Dtype | str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ConfigError(f"dtype must be one of {sorted(dtypes)}; got {name!r}.")
    return dtypes[name]


def _looks_like_path(name: str) -> bool:
    """A hub id is ``org/name``; anything else with a separator, a dot or a tilde is a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def resolve(pretrained: str | None, subfolder: str | None, key: str = "model.pretrained") -> str:
    """Check ``pretrained`` before any download is tried; returns it (a folder is expanded)."""
    what = subfolder or "the component"
    alternative = _ALTERNATIVE.get(subfolder or "", "")
    if not pretrained:
        raise ConfigError(
            f"{what} is loaded from {key}, which is not set. Set {key}=<hub id or diffusers pipeline folder> "
            f"({TINY_HINT})" + (f", or build it from its own config group: {alternative}." if alternative else ".")
        )
    path = Path(str(pretrained)).expanduser()
    if path.is_dir():
        if subfolder and not (path / subfolder).is_dir():
            found = sorted(p.name for p in path.iterdir() if p.is_dir())
            if subfolder in SDXL_ONLY:
                raise ConfigError(
                    f"{key}={pretrained!r} has no {subfolder}/ folder (found: {found or 'nothing'}), so it is not an SDXL base "
                    f"pipeline: model=latent_sdxl needs SDXL's second text encoder (text_encoder_2/ + tokenizer_2/). For an SD 1.x/2.x "
                    f"folder use model=latent_sd; for SDXL set {key}=stabilityai/stable-diffusion-xl-base-1.0 or a local copy "
                    f"(python -m diffusion_lab.tiny_sd outputs/tiny_sdxl --kind sdxl builds a tiny random one offline)."
                )
            raise ConfigError(
                f"{key}={pretrained!r} has no {subfolder}/ folder (found: {found or 'nothing'}). A diffusers Stable "
                f"Diffusion folder has unet/ vae/ text_encoder/ tokenizer/ scheduler/ (save one with "
                f"pipe.save_pretrained(DIR))" + (f"; or build {subfolder} from its own group: {alternative}." if alternative else ".")
            )
        return str(path)
    if _looks_like_path(str(pretrained)):
        raise ConfigError(f"{key}={pretrained!r} is not a folder. Point it at a diffusers pipeline folder ({TINY_HINT}) or a hub id.")
    return str(pretrained)


def offline_error(pretrained: str, subfolder: str | None, key: str, err: Exception) -> ConfigError:
    return ConfigError(
        f"could not load {subfolder or 'the model'} of {key}={pretrained!r}: {type(err).__name__}: {str(err).splitlines()[0].rstrip('.') if str(err) else ''}. "
        f"It is not in the local Hugging Face cache and the hub cannot be reached (no network, or HF_HUB_OFFLINE=1 / "
        f"local_files_only=true). Download it where there is network (`hf download {pretrained} "
        f"--local-dir DIR`) and set {key}=DIR, or run once with network to fill the cache."
    )


def from_pretrained(
    class_name: str,
    pretrained: str | None,
    subfolder: str | None = None,
    local_files_only: bool = False,
    dtype: Dtype | None = None,
    key: str = "model.pretrained",
    quantization: dict | None = None,
    **kwargs,
):
    """``cls.from_pretrained(pretrained, subfolder=...)`` for any diffusers/transformers class
    (``diffusers.UNet2DConditionModel``, ``transformers.CLIPTokenizer``, ...). Where the pipeline folder's
    ``model_index.json`` names another class for ``subfolder`` (an SD3 folder whose ``tokenizer_3`` was saved
    as ``T5Tokenizer``), that class is loaded, as ``DiffusionPipeline.from_pretrained`` does. ``quantization``:
    the ``quantization_config`` and dtype that ``quantization=`` gives (``components/quantization.py``)."""
    from diffusion_lab.components.quantization import after_load, cpu_bitsandbytes

    source = resolve(pretrained, subfolder, key)
    class_name = indexed_class(source, subfolder, local_files_only) or class_name
    cls = get_class(class_name)
    if dtype is not None:
        kwargs["torch_dtype"] = torch_dtype(dtype)
    kwargs.update(quantization or {})
    try:
        with cpu_bitsandbytes(kwargs.get("quantization_config")):
            model = cls.from_pretrained(source, subfolder=subfolder, local_files_only=local_files_only, **kwargs)
        return after_load(model) if quantization else model
    except (OSError, ValueError) as e:  # hub / cache misses surface as OSError subclasses (or ValueError offline)
        if Path(source).is_dir():
            raise ConfigError(f"could not load {class_name} from {source}/{subfolder or ''}: {e}. The folder is not a valid diffusers/transformers save.") from e
        raise offline_error(source, subfolder, key, e) from e


def indexed_class(source: str, subfolder: str | None, local_files_only: bool = False) -> str | None:
    """``library.Class`` that ``source``'s ``model_index.json`` names for ``subfolder`` (None: no index, no entry,
    or a class this process cannot import: the configured class is used then)."""
    if not subfolder:
        return None
    from diffusers import DiffusionPipeline

    try:
        entry = DiffusionPipeline.load_config(source, local_files_only=local_files_only).get(subfolder)
    except (OSError, ValueError):
        return None
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not all(entry):
        return None
    try:
        get_class(f"{entry[0]}.{entry[1]}")
    except Exception:  # hydra wraps what the import raises
        return None
    return f"{entry[0]}.{entry[1]}"


def load_scheduler(
    pretrained: str | None,
    class_name: str | None = None,
    subfolder: str = "scheduler",
    local_files_only: bool = False,
    key: str = "model.pretrained",
    **overrides,
):
    """The pipeline's own noise schedule (``scheduler/scheduler_config.json``), optionally as another
    sampler class (``class_name=ddim``) or with keys overridden (``prediction_type=v_prediction``)."""
    from diffusers import DDPMScheduler

    source = resolve(pretrained, subfolder, key)
    try:
        config = dict(DDPMScheduler.load_config(source, subfolder=subfolder, local_files_only=local_files_only))
    except (OSError, ValueError) as e:
        raise offline_error(source, subfolder, key, e) from e
    config.update({k: v for k, v in overrides.items() if v is not None})
    return build_scheduler(class_name or f"diffusers.{config['_class_name']}", **config)


# --- every hub download a composed config needs, checked before anything is loaded ------------------------------

_HF_DATASET = "diffusion_lab.data.HFImageDataset"  # the only data source that takes a hub name (data=hf's data.name)
_LOAD_SCHEDULER = f"{__name__}.load_scheduler"  # its subfolder defaults to scheduler/


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (also when set after its import, as tests do)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _source_key(node, field: str, key: str) -> str:
    """The key a user sets: ``model.pretrained`` for a ``${model.pretrained}`` interpolation, else ``key`` itself."""
    raw = node._get_node(field)._value()
    if isinstance(raw, str) and raw.startswith("${") and raw.endswith("}") and raw.count("${") == 1 and ":" not in raw:
        return raw[2:-1]
    return key


def _hub_id(value) -> str | None:
    """``value`` if it names a hub repository (``org/name``); None for unset, local folders, and paths that
    are not there (``resolve`` refuses those with their own message)."""
    if not isinstance(value, str) or not value or Path(value).expanduser().exists() or _looks_like_path(value):
        return None
    return value


def hub_ids_used(cfg) -> dict[tuple[str, str], dict]:
    """{(hub id, "model" | "dataset"): {"keys": [...], "subfolders": {...}, "local_files_only": bool}} for every
    ``pretrained`` of a config node (unet, vae, text encoders, scheduler, controlnet), ``model.safety_checker``
    and data=hf's ``data.name``, found by walking ``cfg`` (interpolations are followed to the key they copy)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    found: dict[tuple[str, str], dict] = {}

    def add(repo: str | None, kind: str, key: str, subfolder=None, local_only=False) -> None:
        if repo is None:
            return
        entry = found.setdefault((repo, kind), {"keys": [], "subfolders": set(), "local_files_only": False})
        if key not in entry["keys"]:
            entry["keys"].append(key)
        if isinstance(subfolder, str) and subfolder:
            entry["subfolders"].add(subfolder)
        entry["local_files_only"] |= bool(local_only)

    def value(node, field):
        try:
            return node.get(field)
        except Exception:  # an interpolation to a key this config lacks: not ours to report
            return None

    def walk(node, path: str) -> None:
        if isinstance(node, DictConfig):
            if "pretrained" in node:
                key = _source_key(node, "pretrained", f"{path}pretrained")
                subfolder = value(node, "subfolder") or ("scheduler" if value(node, "_target_") == _LOAD_SCHEDULER else None)
                add(_hub_id(value(node, "pretrained")), "model", key, subfolder, value(node, "local_files_only"))
            if value(node, "_target_") == _HF_DATASET and not value(node, "data_files"):
                add(_hub_id(value(node, "name")), "dataset", _source_key(node, "name", f"{path}name"))
            children = [(k, node._get_node(k)) for k in node.keys()]
        elif isinstance(node, ListConfig):
            children = [(str(i), node._get_node(i)) for i in range(len(node))]
        else:
            return
        for k, child in children:
            if child is not None and not OmegaConf.is_interpolation(child) and isinstance(child, (DictConfig, ListConfig)):
                walk(child, f"{path}{k}.")

    walk(cfg, "")
    model = cfg.get("model") if isinstance(cfg, DictConfig) else None
    if isinstance(model, DictConfig) and "safety_checker" in model:
        add(_hub_id(value(model, "safety_checker")), "model", "model.safety_checker", "safety_checker", value(model, "local_files_only"))
    return found


def in_hub_cache(repo: str, kind: str, subfolders=()) -> bool:
    """Whether the local Hugging Face cache holds ``repo`` (and its ``subfolders``), or, for a data set,
    ``datasets``' own prepared copy (which ``load_dataset`` uses offline)."""
    from huggingface_hub import constants, snapshot_download

    try:
        snapshot = Path(snapshot_download(repo, repo_type=kind, local_files_only=True))
        if all((snapshot / s).is_dir() for s in subfolders):
            return True
    except Exception:  # LocalEntryNotFoundError and friends: not cached
        pass
    if kind == "dataset":
        root = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets").expanduser()
        return (root / repo.replace("/", "___")).is_dir()
    return False


def check_hub_downloads(cfg) -> None:
    """Before anything is loaded: with the hub out of reach (``HF_HUB_OFFLINE=1``, or ``local_files_only``),
    every hub id the run uses that is not in the local cache, in ONE ``ConfigError`` with the download command
    and the key to set, instead of failing on the first (after ~30 s of retries) and then on the next."""
    offline = hub_offline()
    missing = []
    for (repo, kind), use in hub_ids_used(cfg).items():
        if not (offline or use["local_files_only"]) or in_hub_cache(repo, kind, sorted(use["subfolders"])):
            continue
        keys = " / ".join(use["keys"])
        if kind == "dataset":
            missing.append(f"the data set {repo} ({keys}): `hf download {repo} --repo-type dataset --local-dir DIR`, then set "
                           f"data.data_files='DIR/**/*.parquet'")
        else:
            missing.append(f"the model {repo} ({keys}): `hf download {repo} --local-dir DIR`, then set {use['keys'][0]}=DIR")
    if missing:
        why = "HF_HUB_OFFLINE=1" if offline else "local_files_only=true"
        raise ConfigError(
            f"this run needs {len(missing)} download(s) from the Hugging Face hub that are not in the local cache, and the hub "
            f"cannot be used ({why}): " + "; ".join(f"({i}) {m}" for i, m in enumerate(missing, 1)) + ". Download them where "
            "there is network and point the keys at the folders, or run once with network (HF_HUB_OFFLINE unset) to fill the cache."
        )
