"""Every private API of another library that diffusion_lab relies on, each touched once, here, behind
one small named function: ``lightning`` (pytorch_lightning / lightning_fabric), ``litdata``, ``diffusers``
(pipelines' underscore helpers, ``ModelMixin`` attributes), ``torchmetrics`` and ``torch`` (its private
modules). Each docstring names the
version it was checked against; ``tests/test_compat.py`` exercises every adapter against the installed
library and names the adapter and the version when one breaks. When it does, fix the adapter (often a
renamed attribute, or a public API that now does the job), not its callers.

The modules import their library lazily or only where the caller already needs it: importing
``diffusion_lab.compat.diffusers`` does not import Lightning, and ``compat.litdata`` works without litdata
until an adapter is called."""
