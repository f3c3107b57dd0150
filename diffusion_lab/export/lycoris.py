"""LoKr runs in LyCORIS keys (``.lokr_w1`` / ``.lokr_w2`` or their ``_a`` / ``_b`` factors) for
FLUX.2 [klein] and Z-Image, whose diffusers loaders read them back (``lora_kohya.safetensors``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from diffusion_lab.components.adapters import KOHYA_FILE

log = logging.getLogger(__name__)
_LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
# module path -> LyCORIS key prefix, for the pipelines whose loader reads LyCORIS LoKr keys back
LOKR_NAMES: dict[str, Callable[[str], str]] = {
    "Flux2KleinPipeline": lambda path: "lycoris_" + path.replace(".", "_"),  # LyCORIS on the diffusers model
    "ZImagePipeline": lambda path: "diffusion_model." + path,  # ai-toolkit: the diffusers paths
}


def lokr_state(pipeline_class: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s LoKr (adapter ``default``) as LyCORIS keys ``<name>.lokr_w1`` ... with peft's scale
    alpha / r baked into the first factor and no ``.alpha`` key (LyCORIS then applies none), read back through
    ``<pipeline_class>.lora_state_dict`` when written. ValueError: no LyCORIS reader for the pipeline, a
    Tucker (conv) factor, or a name the reader does not map back."""
    import diffusers
    from peft.tuners.lokr.layer import LoKrLayer

    if pipeline_class not in LOKR_NAMES:
        raise ValueError(f"{pipeline_class} has no LyCORIS LoKr reader in diffusers to check a file against (LyCORIS files: {', '.join(LOKR_NAMES)})")
    name, out, paths = LOKR_NAMES[pipeline_class], {}, []
    for path, m in model.named_modules():
        if not isinstance(m, LoKrLayer) or "default" not in m.lokr_w2 and "default" not in m.lokr_w2_a:
            continue
        if "default" in m.lokr_t2:
            raise ValueError(f"{path}: a Tucker-decomposed (conv) LoKr factor has no checked LyCORIS layout here")
        factors = {f: getattr(m, f)["default"].detach().float().cpu() for f in _LOKR_FACTORS if "default" in getattr(m, f)}
        first = "lokr_w1" if "lokr_w1" in factors else "lokr_w1_a"
        factors[first] = factors[first] * float(m.scaling["default"])
        out.update({f"{name(path)}.{f}": w.contiguous() for f, w in factors.items()})
        paths.append(path)
    read = getattr(diffusers, pipeline_class).lora_state_dict(dict(out))
    lost = [p for p in paths if not any(k.startswith(f"transformer.{p}.lokr_") for k in read)]
    if lost:
        raise ValueError(f"no LyCORIS name {pipeline_class} reads back for the LoKr of {', '.join(lost[:3])} (adapter.target_modules)")
    return out


def save_lycoris(pipeline_class: str, out_dir: str, model: torch.nn.Module) -> Path | None:
    """``<out_dir>/lora_kohya.safetensors`` of a LoKr run (LyCORIS keys); None with a warning where none can be written."""
    from safetensors.torch import save_file

    try:
        state = lokr_state(pipeline_class, model)
    except ValueError as e:
        log.warning("no %s: %s", KOHYA_FILE, e)
        return None
    path = Path(out_dir) / KOHYA_FILE
    save_file(state, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "lokr"}'})
    return path
