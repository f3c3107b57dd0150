"""Read a checkpoint someone shared without running code from it.

A Lightning ``.ckpt`` is a pickle, and the config stored in it is instantiated, so either could
call any Python function on the machine that samples from it. Here:

* the file is read with ``torch.load(weights_only=True)``: tensors, containers and plain values
  only (what ``diffusion_lab.train`` writes, and what Lightning itself resumes with);
* the stored config is built only when every name in it that Hydra or the project imports
  (``_target_``, ``class_name``, ``library``, a dotted path such as a sampler's scheduler class)
  is one that ``conf/`` itself names, or an optimizer / scheduler / ``nn.Module`` / tokenizer
  class of the packages the project builds from. Package prefixes alone are not enough:
  ``torch.save`` or ``torch.hub.load`` are in ``torch``.

``trust_checkpoint=true`` (``load_checkpoint(..., trust=True)``) skips both checks for a file
whose author you trust.
"""

from __future__ import annotations

import functools
import importlib.util
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from diffusion_lab.utils.errors import ConfigError

# The packages a stored config may name code from (the first gate; nothing else is imported).
PACKAGES = ("diffusion_lab", "diffusers", "transformers", "peft", "torch", "pytorch_lightning", "lightning_fabric", "torchmetrics")
# Keys whose string value is imported by name: Hydra's, components/pretrained.py's, quantization's.
CODE_KEYS = ("_target_", "class_name", "library")
# Types torch.load(weights_only=True) needs beyond its defaults. What the project writes (loaded
# from pixel, latent, LoRA, textual-inversion, SDXL, FSDP meta.pt checkpoints) needs none: the
# config is stored as plain containers, hyperparameters are scalars, RNG states are tensors.
SAFE_GLOBALS: tuple = ()

_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_NAMED_IN_CONF = re.compile(r"\b((?:" + "|".join(PACKAGES) + r")(?:\.\w+)+)")
TRUST_HINT = "If you trust whoever made this file, load it anyway with trust_checkpoint=true (it can then run any code)."


def load_checkpoint(path: str | Path, map_location: str = "cpu", trust: bool = False) -> dict:
    """``torch.load`` of ``path``: tensors and plain values only unless ``trust``; a ConfigError
    naming the Python object the file asks for otherwise."""
    if trust:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL (\S+)", str(e))
        what = f"the Python object {named.group(1)}" if named else "a Python object that is not a tensor or plain value"
        raise ConfigError(
            f"{path} asks to build {what} when it is read, which a checkpoint written by diffusion_lab.train never does "
            f"(loading it could run code), so it was not read. {TRUST_HINT}"
        ) from None


def check_config(config: Any, source: str, key: str = "model") -> None:
    """ConfigError naming the first ``key.path`` of ``config`` (a plain container loaded from
    ``source``) that would import or call code ``conf/`` does not build, or that is an
    interpolation (``${...}``: resolvers such as ``oc.create`` could make a ``_target_``)."""
    for path, name, value in _strings(config, key):
        if "${" in value:
            raise ConfigError(f"{source}: its stored config has an interpolation at {path}={value!r}; diffusion_lab.train stores resolved configs, so it was not built. {TRUST_HINT}")
        if name in CODE_KEYS or (_DOTTED.match(value) and importlib.util.find_spec(value.split(".")[0]) is not None):
            if not allowed(value, library=name == "library"):
                raise ConfigError(
                    f"{source}: its stored config names {path}={value!r}, which diffusion_lab's configs never build; a checkpoint "
                    f"can call any function that way, so it was not built. {TRUST_HINT}"
                )


def allowed(name: str, library: bool = False) -> bool:
    """Whether a stored config may name ``name``: ``conf/`` names it, or it is a class of one of
    ``PACKAGES`` whose construction only builds an object (an optimizer, LR scheduler, diffusers
    scheduler, ``nn.Module``, tokenizer). ``library``: a top-level package of ``PACKAGES``."""
    if not isinstance(name, str):
        return False
    if library:
        return name in PACKAGES
    if name.split(".")[0] not in PACKAGES:
        return False  # not imported at all
    if name in names_in_conf():
        return True
    from hydra.utils import get_object

    try:
        obj = get_object(name)
    except Exception:
        return False
    return isinstance(obj, type) and issubclass(obj, _safe_bases())


@functools.cache
def names_in_conf() -> frozenset[str]:
    """Every dotted name of ``PACKAGES`` that a file under ``conf/`` mentions."""
    from diffusion_lab.utils.config_path import conf_dir

    return frozenset(m for p in conf_dir().rglob("*.yaml") for m in _NAMED_IN_CONF.findall(p.read_text()))


@functools.cache
def _safe_bases() -> tuple[type, ...]:
    from diffusers import SchedulerMixin
    from transformers import PreTrainedTokenizerBase

    return (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.nn.Module, SchedulerMixin, PreTrainedTokenizerBase)


def _strings(node: Any, path: str):
    """``(path, key, value)`` for every string in a plain container (dict keys are not values)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, str):
                yield f"{path}.{k}", k, v
            elif k in CODE_KEYS and v is not None:
                yield f"{path}.{k}", k, repr(v)  # a _target_ that is not a name is never one conf/ builds
            else:
                yield from _strings(v, f"{path}.{k}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            if isinstance(v, str):
                yield f"{path}[{i}]", None, v
            else:
                yield from _strings(v, f"{path}[{i}]")
