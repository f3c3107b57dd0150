"""Known noise from the libraries, filtered once at import so the warnings that matter are seen.
Each entry says why it is safe to drop; anything else still prints."""

from __future__ import annotations

import logging
import warnings

# (logger that emits it, text in the message, why it is noise here)
_LOG_NOISE = (
    # diffusers' pipelines import CLIPImageProcessor; the project never uses torchvision and README
    # says not to install it: the PIL fallback transformers picks is the intended path
    ("transformers.utils.import_utils", "requires torchvision (not installed)"),
    # diffusers passes torch_dtype= to transformers' from_pretrained when it loads a pipeline's text encoder
    ("transformers.configuration_utils", "`torch_dtype` is deprecated"),
    ("transformers.modeling_utils", "`torch_dtype` is deprecated"),
    # an advertisement printed by every Trainer without a LitLogger
    ("pytorch_lightning.utilities.rank_zero", "Tip: For seamless cloud logging"),
    ("lightning_fabric.utilities.rank_zero", "Tip: For seamless cloud logging"),
    # quantization= backends (pyproject's quant extra), imported by diffusers / transformers at import time:
    # bitsandbytes' optional faster CPU kernel comes from the `kernels` package; its own kernel is used without it
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # torchao's CUDA-only kernels (mxfp8, cutlass) do not load into a CPU torch; its CPU paths do not need them
    ("torchao", "Could not load this library"),
    # torchao registers its enums with torch's pytree, which now supports them natively
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported"),
    # torchao tensor classes of older releases, needed only to unpickle checkpoints saved torchao-quantized;
    # quantization= quantizes while loading ordinary weights
    ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects"),
)

# (message regex, category): Python warnings raised inside the libraries, not by project code
_WARNING_NOISE = (
    # Lightning 2.6's pytree helper on torch 2.13 (pytorch_lightning/utilities/_pytree.py)
    (r".*isinstance\(treespec, LeafSpec\)` is deprecated", Warning),
)


class _DropMessages(logging.Filter):
    def __init__(self, texts: tuple[str, ...]) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(t in message for t in self.texts)


def quiet_known_noise() -> None:
    """Install the filters (idempotent)."""
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, text in _LOG_NOISE:
        by_logger[name] = (*by_logger.get(name, ()), text)
    for name, texts in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(texts))
    for message, category in _WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
