"""The typed configs of ``diffusion_lab.sample`` and ``diffusion_lab.evaluate``: the schema that
``conf/sample.yaml`` and ``conf/evaluate.yaml`` are checked against.

The types live here, the values (and the comments saying why) in the YAML files: every field is
``MISSING`` until its file sets it. Composing ``sample``/``evaluate`` merges the YAML onto these
dataclasses, so ``num_image=4`` (no such key) or ``num_images=four`` (not an int) is refused when
the command line is read, with the key in the message. ``register_configs()`` (run by
``import diffusion_lab``) puts them in Hydra's ConfigStore as the ``schema`` group, which
``sample.yaml`` lists first (``schema: sample``) and ``evaluate.yaml`` overrides (``schema: evaluate``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING


@dataclass
class MemorySavers:
    """Savers for big text-to-image models on small GPUs (``memory.*``)."""

    attention_slicing: bool = MISSING
    vae_slicing: bool = MISSING
    vae_tiling: bool = MISSING
    cpu_offload: bool = MISSING


@dataclass
class SampleConfig:
    """``conf/sample.yaml``: where the model comes from, how many images, how they are drawn."""

    task_name: str = MISSING
    pipeline: Optional[str] = MISSING
    ckpt_path: Optional[str] = MISSING
    use_ema: bool = MISSING
    trust_checkpoint: bool = MISSING
    num_images: int = MISSING
    batch_size: int = MISSING
    num_inference_steps: Optional[int] = MISSING
    seed: int = MISSING
    out_dir: str = MISSING
    device: str = MISSING
    local_files_only: bool = MISSING
    prompt: Any = MISSING  # a string or a list of strings (read_prompts checks which)
    prompts_file: Optional[str] = MISSING
    negative_prompt: Optional[str] = MISSING
    guidance_scale: Optional[float] = MISSING
    guidance_rescale: float = MISSING
    height: Optional[int] = MISSING
    width: Optional[int] = MISSING
    lora: Optional[str] = MISSING
    lora_scale: float = MISSING
    refiner: Optional[str] = MISSING
    refiner_start: float = MISSING
    safety_checker: bool = MISSING
    dtype: str = MISSING
    memory: MemorySavers = field(default_factory=MemorySavers)
    # config groups: their own files are their schema
    paths: Any = MISSING
    sampler: Any = None  # conf/sampler/<name>.yaml; None = the sampler the model was trained with


@dataclass
class EvaluateConfig(SampleConfig):
    """``conf/evaluate.yaml``: every ``sample`` key, plus the images to score and the reference."""

    tags: List[str] = MISSING
    images_dir: Optional[str] = MISSING
    reference_dir: Optional[str] = MISSING
    num_reference: Optional[int] = MISSING
    kid_subsets: int = MISSING
    kid_subset_size: int = MISSING
    is_splits: int = MISSING
    clip_model: Optional[str] = MISSING
    digit_scores: Any = MISSING  # auto | true | false (evaluate.py checks which)
    save_images: bool = MISSING
    data: Any = MISSING
    features: Any = MISSING
    logger: Any = None


def register_configs() -> None:
    """The schemas as options of the ``schema`` group (package ``_global_``: they type the root)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="schema", name="sample", node=SampleConfig, package="_global_")
    store.store(group="schema", name="evaluate", node=EvaluateConfig, package="_global_")
