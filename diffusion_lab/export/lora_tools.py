"""LoRA <-> full fine-tune: fuse LoRA files into a base pipeline (``merge``), and the LoRA closest to a
full fine-tune (``extract``: truncated SVD of the weight difference, Eckart-Young). ``python -m
diffusion_lab.lora`` is the command line.

Both work on any diffusers pipeline folder (or hub id) whose class has a LoRA loader: the backbone is
the pipeline's ``unet`` or ``transformer``. Reading LoRA files is diffusers' own ``load_lora_weights``
(which also converts the kohya / A1111 layouts it knows); writing is the pipeline class's
``save_lora_weights``, so the extracted file loads wherever a trained one does.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence

import torch

from diffusion_lab.utils.errors import ConfigError

LORA_FILE = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes and load_lora_weights(dir) reads
_LORA_MARKS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up", "lora_magnitude_vector", "dora_scale")


def _not_a_pipeline(path: str, e: Exception) -> ConfigError:
    first = str(e).splitlines()[0] if str(e) else ""
    return ConfigError(f"{path}: not a diffusers pipeline folder or hub id ({type(e).__name__}: {first}); pass the folder a full fine-tune exported (model_index.json inside).")


def load_pipeline(path: str):
    """The pipeline in ``path`` (folder or hub id), fp32 on CPU."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise _not_a_pipeline(path, e) from e


def backbone_name(pipe) -> str:
    """``"unet"`` or ``"transformer"``: the pipeline component a LoRA of the backbone targets."""
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return name
    raise ConfigError(f"{type(pipe).__name__} has neither a unet nor a transformer; LoRA tools need one of them.")


def load_backbone(path: str) -> tuple[type, str, torch.nn.Module]:
    """(pipeline class, backbone name, backbone in fp32) of the pipeline folder or hub id ``path``:
    only the backbone is loaded (not the text encoders or the VAE), as ``model_index.json`` names it."""
    import diffusers

    try:
        index = diffusers.DiffusionPipeline.load_config(path)
    except (OSError, ValueError) as e:
        raise _not_a_pipeline(path, e) from e
    name = next((n for n in ("unet", "transformer") if (index.get(n) or [None, None])[1]), None)
    if name is None:
        raise ConfigError(f"{path}: its model_index.json names neither a unet nor a transformer; LoRA tools need one of them.")
    model_class = getattr(diffusers, index[name][1])
    return getattr(diffusers, index["_class_name"]), name, model_class.from_pretrained(path, subfolder=name, dtype=torch.float32)


def lora_file(path: str | Path) -> Path:
    """The LoRA safetensors file of ``path`` (a file, or a folder holding ``pytorch_lora_weights.safetensors``),
    checked to hold LoRA weights. Raises ConfigError naming the file otherwise."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if p.is_dir():
        p = p / LORA_FILE
    if not p.is_file():
        raise ConfigError(f"{path}: no LoRA file there (a .safetensors file, or a folder with {LORA_FILE} as a LoRA run exports).")
    try:
        with safe_open(str(p), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{p}: not a safetensors file ({e}); a LoRA is a .safetensors file with lora_A/lora_B (diffusers) or lora_down/lora_up (kohya) keys.") from e
    if not any(m in k for k in keys for m in _LORA_MARKS):
        raise ConfigError(
            f"{p}: not a LoRA: none of its {len(keys)} tensors ({', '.join(keys[:3])}, ...) is a lora_A/lora_B (diffusers) or "
            "lora_down/lora_up (kohya) weight. A full model checkpoint is a base, not a LoRA: pass it as the base pipeline."
        )
    return p


def _lora_tensors(pipe, adapter: str) -> int:
    """How many LoRA tensors of adapter ``adapter`` the pipeline's components hold."""
    from peft.utils import get_peft_model_state_dict

    n = 0
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module) and adapter in (getattr(module, "peft_config", None) or {}):
            n += len(get_peft_model_state_dict(module, adapter_name=adapter))
    return n


def load_lora(pipe, path: str | Path, adapter: str) -> Path:
    """``pipe.load_lora_weights`` of the LoRA at ``path`` as ``adapter``, every LoRA tensor of the file
    consumed by a layer of ``pipe`` (else ConfigError: a LoRA for another family or base)."""
    from safetensors import safe_open

    p = lora_file(path)
    with safe_open(str(p), framework="pt") as f:
        n_file = sum(1 for k in f.keys() if any(m in k for m in _LORA_MARKS))
    hint = f"{p}: a LoRA for another family or base than {type(pipe).__name__}"
    try:
        pipe.load_lora_weights(str(p), adapter_name=adapter)
    except (ValueError, RuntimeError, KeyError, AttributeError) as e:
        raise ConfigError(f"{hint} ({type(e).__name__}: {str(e).splitlines()[0][:300]}); merge it into the base it was trained on.") from e
    n_loaded = _lora_tensors(pipe, adapter)
    if n_loaded < n_file:
        raise ConfigError(f"{hint}: only {n_loaded} of its {n_file} LoRA tensors match a layer of the pipeline; merge it into the base it was trained on.")
    return p


def merge(base: str, loras: Sequence[tuple[str, float]], out: str) -> Path:
    """Fuse ``loras`` (path, weight) into the pipeline ``base`` and ``save_pretrained`` it to ``out``
    (atomically): diffusers' ``load_lora_weights`` + ``set_adapters(weights)`` + ``fuse_lora`` +
    ``unload_lora_weights``, so the folder's images equal ``base`` with the LoRAs loaded at those weights."""
    from diffusion_lab.utils.io import atomic_dir

    if not loras:
        raise ConfigError("merge needs at least one LoRA file (--lora FILE[:WEIGHT]).")
    pipe = load_pipeline(base)
    names = [f"lora_{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        load_lora(pipe, path, name)
    pipe.set_adapters(names, adapter_weights=[float(w) for _, w in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()  # the fused base weights stay; the LoRA layers go
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(out)


def low_rank(delta: torch.Tensor, rank: int | None = None, energy: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-r factors of ``delta`` [out, in] (Eckart-Young): ``up`` [out, r] = U sqrt(S),
    ``down`` [r, in] = sqrt(S) V^T, so up @ down is the truncated SVD. ``rank``: r; ``energy``: the
    smallest r whose singular values keep that share of sum(S^2) (1.0: every non-zero one)."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    if energy is not None:
        share = torch.cumsum(S**2, 0) / (S**2).sum().clamp_min(1e-300)
        rank = int((share < energy - 1e-12).sum()) + 1
        rank = min(rank, int((S > S[0] * 1e-12).sum()) or 1)
    assert rank is not None
    root = S[:rank].sqrt()
    return (U[:, :rank] * root).float(), (root[:, None] * Vh[:rank]).float()


def _adaptable(module: torch.nn.Module) -> bool:
    """A layer a LoRA can carry exactly: Linear, or a 1x1 Conv2d (a Linear over channels)."""
    if isinstance(module, torch.nn.Linear):
        return True
    return isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


def weight_deltas(base: torch.nn.Module, tuned: torch.nn.Module) -> tuple[dict[str, torch.Tensor], float]:
    """Per adaptable layer name -> tuned W - base W as [out, in] (unchanged layers left out), and the
    share of the whole squared weight difference that these layers hold (the rest: 3x3 convs, norms,
    biases, embeddings, which a LoRA of Linear layers cannot carry)."""
    tuned_params = dict(tuned.named_parameters())
    base_params = dict(base.named_parameters())
    if tuned_params.keys() != base_params.keys() or any(tuned_params[k].shape != v.shape for k, v in base_params.items()):
        raise ConfigError(f"the fine-tuned {type(tuned).__name__} does not have the base's layers and shapes: extract from a fine-tune of this base.")
    total = sum(float((tuned_params[k].detach().double() - v.detach().double()).pow(2).sum()) for k, v in base_params.items())
    deltas, kept = {}, 0.0
    for name, module in base.named_modules():
        if not _adaptable(module):
            continue
        d = (tuned_params[f"{name}.weight"].detach().double() - module.weight.detach().double()).flatten(1)
        if d.abs().max() > 0:
            deltas[name] = d
            kept += float(d.pow(2).sum())
    return deltas, (kept / total if total > 0 else 1.0)


def extract(base: str, tuned: str, out: str, rank: int | None = None, energy: float | None = None) -> dict:
    """Write to ``out`` the LoRA of the backbone (``rank`` r, or per layer the smallest rank keeping
    ``energy`` of the squared singular values) that best approximates ``tuned`` - ``base``, in the
    pipeline's own LoRA layout (``pipe.load_lora_weights(out)`` on the base). Returns a summary:
    layers, ranks, ``covered`` (share of the weight difference in Linear / 1x1 conv layers)."""
    from peft import LoraConfig

    from diffusion_lab.components.adapters import add_lora, lora_metadata, lora_state_dict
    from diffusion_lab.utils.io import atomic_dir

    if (rank is None) == (energy is None):
        raise ConfigError("extract needs exactly one of --rank R or --energy SHARE (0 < SHARE <= 1).")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"--energy {energy}: a share of the energy, 0 < SHARE <= 1.")
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank {rank}: a rank is at least 1.")
    pipeline_class, name, backbone = load_backbone(base)
    _, tuned_name, tuned_backbone = load_backbone(tuned)
    if tuned_name != name or type(tuned_backbone) is not type(backbone):
        raise ConfigError(f"{tuned}: its {tuned_name} is a {type(tuned_backbone).__name__}, {base}'s {name} a {type(backbone).__name__}; extract from a fine-tune of this base.")
    deltas, covered = weight_deltas(backbone, tuned_backbone)
    if not deltas:
        raise ConfigError(f"{tuned}: no Linear or 1x1 conv layer of its {name} differs from {base}'s; nothing to extract.")
    if rank is not None:
        too_big = {k: min(d.shape) for k, d in deltas.items() if min(d.shape) < rank}
        if too_big:
            layer, size = next(iter(too_big.items()))
            raise ConfigError(
                f"--rank {rank} is above the size of {len(too_big)} layer(s) of {tuned}'s {name} (e.g. {layer}: at most {size}); "
                f"pass --rank {min(too_big.values())} or less, or --energy 1.0 for each layer's full rank."
            )
    factors = {k: low_rank(d, rank, energy) for k, d in deltas.items()}
    ranks = {k: up.shape[1] for k, (up, _) in factors.items()}
    r = max(ranks.values())
    # alpha = rank per layer: peft's scale alpha / r is 1, so up @ down is the whole update
    config = LoraConfig(r=r, lora_alpha=r, target_modules=list(factors), rank_pattern=ranks, alpha_pattern=ranks, init_lora_weights=False)
    add_lora(backbone, config)
    modules = dict(backbone.named_modules())
    with torch.no_grad():
        for k, (up, down) in factors.items():
            layer = modules[k]
            layer.lora_A["default"].weight.copy_(down.reshape(layer.lora_A["default"].weight.shape))
            layer.lora_B["default"].weight.copy_(up.reshape(layer.lora_B["default"].weight.shape))
    kwargs = {f"{name}_lora_layers": lora_state_dict(backbone), f"{name}_lora_adapter_metadata": lora_metadata(backbone)}
    with atomic_dir(out) as tmp:
        pipeline_class.save_lora_weights(tmp, safe_serialization=True, **kwargs)
    return {"layers": len(ranks), "ranks": ranks, "covered": covered, "file": str(Path(out) / LORA_FILE)}
