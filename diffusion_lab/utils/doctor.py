"""The environment checks of ``python -m diffusion_lab.doctor``: versions, imports, clashes,
devices, hub reachability, offline modes. Each row is ok / warn / FAIL with what to do.
The usual culprit for "import diffusers fails" is a package that diffusers or transformers import
when present (torchvision built for another torch, jax/flax) rather than diffusers itself.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import sys

REQUIRED = ["torch", "pytorch_lightning", "hydra", "omegaconf", "diffusers", "transformers", "peft", "wandb", "torchmetrics", "datasets"]
DIST = {"pytorch_lightning": "pytorch-lightning", "hydra": "hydra-core"}
HUB_TIMEOUT_S = 3.0  # the reachability check of the hub; a reachable hub answers a HEAD in well under a second


def _version(name: str) -> str | None:
    try:
        return md.version(DIST.get(name, name))
    except md.PackageNotFoundError:
        return None


def hub_unreachable(endpoint: str, timeout: float = HUB_TIMEOUT_S) -> str | None:
    """Why ``endpoint`` cannot be reached within ``timeout`` seconds (None: it answered, any HTTP
    status). Honours HTTPS_PROXY / HTTP_PROXY as the hub client does."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (OSError, ValueError) as e:  # URLError, timeouts, refused connections, a malformed endpoint
        return str(getattr(e, "reason", e)) or type(e).__name__
    return None


def hub_row() -> tuple[str, str, str]:
    """The Hugging Face hub line: offline by HF_HUB_OFFLINE, reachable, or not (checked with a short
    timeout: unreachable and not offline, every hub access retries for ~30 s before it fails)."""
    cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return ("ok", f"Hugging Face hub: offline (HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']}); cache {cache}",
                "hub ids resolve only from the cache; point model.pretrained at a local folder otherwise.")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    why = hub_unreachable(endpoint)
    if why is None:
        return ("ok", f"Hugging Face hub: online ({endpoint} reachable); cache {cache}", "")
    return ("warn", f"Hugging Face hub: unreachable ({endpoint}: {why}; checked with a {HUB_TIMEOUT_S:g} s timeout); cache {cache}",
            "every hub access would retry for ~30 s before failing. Work offline: `export HF_HUB_OFFLINE=1` (hub ids then "
            "resolve from the cache only) and point model.pretrained at local folders; or fix the network or proxy (HTTPS_PROXY).")


def check() -> list[tuple[str, str, str]]:
    """[(status, what, advice)] with status in ok | warn | FAIL."""
    rows: list[tuple[str, str, str]] = []
    rows.append(("ok", f"python {sys.version.split()[0]} ({sys.executable})", ""))
    # Optional packages that break imports when they are present but built for another stack.
    tv = _version("torchvision")
    if tv:
        try:
            importlib.import_module("torchvision")
            rows.append(("ok", f"torchvision {tv} imports", ""))
        except Exception as e:  # e.g. "operator torchvision::nms does not exist"
            rows.append(("FAIL", f"torchvision {tv} is installed but does not import ({type(e).__name__}: {e})",
                         f"transformers/diffusers import torchvision when it is present, so this breaks them. diffusion_lab does not need torchvision: `{sys.executable} -m pip uninstall -y torchvision` (or install the torchvision built for torch {_version('torch')})."))
    for pkg in ("jax", "flax"):
        if _version(pkg):
            rows.append(("warn", f"{pkg} {_version(pkg)} is installed", f"diffusion_lab never uses it; if `import diffusers` or `import transformers` fails or is slow, `pip uninstall {pkg}`."))
    for name in REQUIRED:
        try:
            importlib.import_module(name)
            rows.append(("ok", f"{name} {_version(name)}", ""))
        except Exception as e:
            rows.append(("FAIL", f"import {name} failed: {type(e).__name__}: {e}", "reinstall with `make install` (it pins compatible ranges); see the lines above for a clashing package."))
    try:
        import torch

        if torch.cuda.is_available():
            names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            rows.append(("ok", f"CUDA {torch.version.cuda}: {names}; bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no (use trainer.precision=16-mixed)'}", ""))
        else:
            rows.append(("warn", f"no GPU: torch {torch.__version__} runs on {os.cpu_count()} CPU cores", "fine for digits and tiny models; SD fine-tuning needs a GPU (trainer=gpu)."))
    except Exception:
        pass
    rows.append(hub_row())
    from diffusion_lab.utils.resolvers import _wandb_mode

    rows.append(("ok", f"W&B mode: {_wandb_mode()}", "" if _wandb_mode() != "offline" else "runs are written under <run dir>/wandb; upload later with `wandb sync <run dir>/wandb/offline-run-*`."))
    return rows
