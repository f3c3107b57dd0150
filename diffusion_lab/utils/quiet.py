"""Known noise from the libraries, filtered once at import so the warnings that matter are seen.
Each entry says why it is safe to drop; anything else still prints."""

from __future__ import annotations

import io
import logging
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

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
    # a pixel DiT's DiTPipeline has no VAE (export/pipelines.py): save_pretrained records the absent part as
    # [null, null] in model_index.json, which is what loading it back (vae=None) needs; only None parts are dropped
    ("diffusers.pipelines.pipeline_utils", "=None of type <class 'NoneType'> cannot be saved"),
    # DiTPipeline's id2label comes back from model_index.json with string keys (JSON has no int keys), while its
    # annotation says dict[int, str]; DiTPipeline.__init__ converts each key with int(key)
    ("diffusers.pipelines.pipeline_utils", "Expected types for id2label:"),
)

# (message regex, category): Python warnings raised inside the libraries, not by project code
_WARNING_NOISE = (
    # Lightning 2.6's pytree helper on torch 2.13 (pytorch_lightning/utilities/_pytree.py)
    (r".*isinstance\(treespec, LeafSpec\)` is deprecated", Warning),
    # Lightning (loops/fit_loop.py) counts the modules not in train mode at fit start: here the frozen parts (the
    # codec's VAE, the conditioner's text encoders, ControlNet's base UNet), kept in eval mode on purpose by their
    # train() overrides and holding no trainable parameter (tests/test_issue29_smaller.py checks that)
    (r"Found \d+ module\(s\) in eval mode at the start of training", Warning),
    # callbacks.throughput (Lightning's ThroughputMonitor) asks for flops_per_batch to log FLOP/s; images/s does not need it
    (r"When using the `ThroughputMonitor`, you need to define a `flops_per_batch`", Warning),
)

# text in a line that a library print()s to stdout (no logger to filter): dropped inside without_printed_noise()
_PRINT_NOISE = (
    # litdata's optimize() advertises its cloud on every call outside Lightning Studio (processing/functions.py);
    # prepare writes shards on this machine by design
    "Create an account on https://lightning.ai/",
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


class _DropLines(io.TextIOBase):
    """Passes whole lines on to ``stream``, except those holding one of ``texts``."""

    def __init__(self, stream, texts: tuple[str, ...]) -> None:
        self.stream, self.texts, self.pending = stream, texts, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        kept = "".join(f"{line}\n" for line in lines if not any(t in line for t in self.texts))
        if kept:
            self.stream.write(kept)
        return len(text)

    def flush(self) -> None:
        if self.pending and not any(t in self.pending for t in self.texts):
            self.stream.write(self.pending)
        self.pending = ""
        self.stream.flush()


@contextmanager
def without_printed_noise() -> Iterator[None]:
    """Around a library call that print()s known noise (``_PRINT_NOISE``) to stdout; other output passes."""
    original = sys.stdout
    sys.stdout = _DropLines(original, _PRINT_NOISE)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = original
