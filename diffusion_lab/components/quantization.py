"""A quantized frozen base (``quantization=nf4|int8|int8_torchao|float8``): what ``from_pretrained``
of the backbone (diffusers) and of the frozen text encoders (transformers) is given, so the
libraries' own quantizers replace the linear layers while the weights are read.

    quantization=nf4            bitsandbytes 4-bit NormalFloat (QLoRA, Dettmers et al. 2023)
    quantization=int8           bitsandbytes LLM.int8() (Dettmers et al. 2022)
    quantization=int8_torchao   torchao int8 weight-only
    quantization=float8         torchao float8 (e4m3) weight-only

Only adapters train on a quantized base (QLoRA); the layers that are not linear (norms, convs,
embeddings) are held in ``dtype``, which is also the compute dtype of the quantized matmuls.

``load_kwargs`` builds ``{"quantization_config": ..., "torch_dtype": ...}`` for one library; the
bitsandbytes quantizer of diffusers 0.42 refuses a machine without an accelerator even though
bitsandbytes' linears run on CPU, so on such a machine ``cpu_bitsandbytes`` lets it load there
(the one place that touches diffusers' quantizer classes; tests/test_quantization.py runs it).
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Iterator, Literal

import torch

from diffusion_lab.components.pretrained import Dtype, torch_dtype
from diffusion_lab.utils.errors import ConfigError

Backend = Literal["bitsandbytes", "torchao", "quanto"]
Weights = Literal["nf4", "int8", "float8"]
Library = Literal["diffusers", "transformers"]

# backend -> (module to import, what to pip install)
PACKAGES = {
    "bitsandbytes": ("bitsandbytes", "bitsandbytes>=0.45"),
    "torchao": ("torchao", "torchao>=0.10"),
    "quanto": ("optimum.quanto", "optimum-quanto>=0.2.6"),
}
# what each backend quantizes to (the others are a ConfigError)
SUPPORTED = {"bitsandbytes": ("nf4", "int8"), "torchao": ("int8", "float8"), "quanto": ("int8", "float8")}
# adapter variants peft cannot put on an option's layers (found on this stack: peft 0.21, bitsandbytes 0.50)
UNSUPPORTED_VARIANTS = {
    "nf4": {"lokr": "peft's LoKr reads the base weight's shape, which is packed 4-bit here"},
    "int8": {"dora": "peft's DoRA dequantizes the bitsandbytes int8 base in eval and fails there"},
}


def check_installed(backend: Backend, name: str) -> None:
    """ConfigError saying what to pip install when ``backend`` is missing."""
    module, requirement = PACKAGES[backend]
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"quantization={name} quantizes the frozen base with {backend}, which is not installed. Install it with "
            f"`pip install '{requirement}'` (or all backends: `pip install -e '.[quant]'`, which `make install` does), "
            f"or train without quantization: quantization=none."
        )


def library_config(library: Library, backend: Backend, weights: Weights, dtype: Dtype, name: str):
    """The ``quantization_config`` object of ``library`` (``diffusers`` or ``transformers``) for ``backend`` / ``weights``."""
    if weights not in SUPPORTED.get(backend, ()):
        raise ConfigError(
            f"quantization.backend={backend} with quantization.weights={weights} is not an option; "
            f"backends and their weights: {SUPPORTED}. Choose quantization=nf4|int8|int8_torchao|float8."
        )
    check_installed(backend, name)
    lib = importlib.import_module(library)
    if backend == "bitsandbytes":
        if weights == "nf4":
            return lib.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype(dtype))
        return lib.BitsAndBytesConfig(load_in_8bit=True)
    if backend == "torchao":
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

        return lib.TorchAoConfig(Int8WeightOnlyConfig() if weights == "int8" else Float8WeightOnlyConfig())
    if library == "diffusers":
        return lib.QuantoConfig(weights_dtype=weights)
    return lib.QuantoConfig(weights=weights)


def load_kwargs(library: Library, backend: Backend | None, weights: Weights | None, dtype: Dtype = "float32", name: str = "none", enabled: bool = True) -> dict:
    """What ``from_pretrained`` of ``library`` gets for ``quantization=name``: ``quantization_config``
    and the dtype of the layers left unquantized (``{}`` without quantization or when not ``enabled``)."""
    if backend is None or not enabled:
        return {}
    dtype_key = "torch_dtype" if library == "diffusers" else "dtype"  # transformers 5 renamed it
    return {"quantization_config": library_config(library, backend, weights, dtype, name), dtype_key: torch_dtype(dtype)}


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether ``model`` was loaded with a ``quantization_config`` (diffusers and transformers both record the quantizer)."""
    return getattr(model, "hf_quantizer", None) is not None


def after_load(model: torch.nn.Module) -> torch.nn.Module:
    """bitsandbytes' CPU inference kernel repacks a 4-bit weight in place on the first eval forward
    without grad, and fails for layers narrower than its block (64): one layout for train and eval."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


@contextmanager
def cpu_bitsandbytes(quantization_config) -> Iterator[None]:
    """Let diffusers' bitsandbytes quantizers load onto the CPU when there is no accelerator.

    diffusers 0.42's ``validate_environment`` demands a GPU and ``update_device_map`` reads
    ``torch.cuda.current_device()``; bitsandbytes >= 0.45 quantizes and multiplies on CPU, and
    transformers' own bitsandbytes quantizer already loads there. Nothing changes with a GPU."""
    if getattr(quantization_config, "quant_method", None) != "bitsandbytes" or torch.cuda.is_available():
        yield
        return
    from diffusers.quantizers.bitsandbytes import bnb_quantizer

    classes = (bnb_quantizer.BnB4BitDiffusersQuantizer, bnb_quantizer.BnB8BitDiffusersQuantizer)
    saved = [(cls, cls.validate_environment, cls.update_device_map) for cls in classes]
    for cls in classes:
        cls.validate_environment = lambda self, *args, **kwargs: None
        cls.update_device_map = lambda self, device_map: device_map or {"": "cpu"}
    try:
        yield
    finally:
        for cls, validate, update in saved:
            cls.validate_environment, cls.update_device_map = validate, update


def check_quantized_training(family: str, name: str, backbone: torch.nn.Module, lora_config, export_fused: bool) -> None:
    """ConfigError (before training) for what cannot train on a quantized base: full fine-tuning,
    a backbone not read by ``from_pretrained``, an adapter variant the backend's layers do not
    take, and a fused export."""
    if name == "none":
        return
    if lora_config is None:
        raise ConfigError(
            f"quantization={name} with adapter=none: a quantized backbone cannot be fine-tuned in full (its weights are "
            f"integers, no gradient updates them). Train an adapter on it (QLoRA: adapter=lora|dora|lokr), or use "
            f"quantization=none for full fine-tuning."
        )
    if not is_quantized(backbone):
        raise ConfigError(
            f"quantization={name} quantizes the backbone while from_pretrained reads it, but model={family}'s backbone "
            f"({type(backbone).__name__}) is built in-process (e.g. backbone=sd_tiny), not loaded: use the pretrained "
            f"backbone (model.pretrained=<folder or hub id> with the family's default backbone) or quantization=none."
        )
    variant = _variant(lora_config)
    why = UNSUPPORTED_VARIANTS.get(name, {}).get(variant)
    if why:
        raise ConfigError(f"adapter={variant} cannot train on quantization={name}: {why}. Use adapter=lora, or another quantization= option.")
    if export_fused:
        raise ConfigError(
            f"adapter.export_fused=true with quantization={name}: the LoRA would be merged into the quantized weights. The "
            f"adapter export loads on the unquantized base (pipe.load_lora_weights); set adapter.export_fused=false."
        )


def _variant(lora_config) -> str:
    """``lora`` | ``dora`` | ``lokr`` | ``loha`` of a peft config (``components/adapters.lora_config``)."""
    from peft import LoHaConfig, LoKrConfig

    if isinstance(lora_config, LoKrConfig):
        return "lokr"
    if isinstance(lora_config, LoHaConfig):
        return "loha"
    return "dora" if getattr(lora_config, "use_dora", False) else "lora"
