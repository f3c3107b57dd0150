"""torch internals, checked against 2.13. (``nn.Module``'s ``_parameters`` / ``_modules`` / ``_buffers``
and ``_apply`` are used in place where they are, as every PyTorch library does; this module holds the
imports from torch's private modules.) When one breaks, ``tests/test_compat.py`` says which."""

from __future__ import annotations

# The base of a mode that sees every aten op a call dispatches (the op counter of ``metrics/profiling.py``):
# ``torch.utils._python_dispatch.TorchDispatchMode`` (2.13; public ``FlopCounterMode`` is built on it). If it
# moves, import it from its new home here.
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["TorchDispatchMode"]
