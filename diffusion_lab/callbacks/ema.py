"""EMA of the trainable UNet weights (diffusers ``EMAModel``), kept in checkpoints."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import pytorch_lightning as pl
from diffusers.training_utils import EMAModel


class EMACallback(pl.Callback):
    """Keeps an exponential moving average of ``pl_module.base_unet``'s trainable parameters.

    ``decay`` is the final decay; with ``use_ema_warmup`` the decay ramps up as
    ``1 - (1 + step / inv_gamma) ** -power`` (diffusers' warmup), so early EMA is not stuck on the
    random init. Updated once per optimizer step; identical on every DDP rank because the
    gradients (hence the weights) are. Sampling and export use the EMA weights via ``ema_weights``.
    """

    def __init__(self, decay: float = 0.9999, use_ema_warmup: bool = True, inv_gamma: float = 1.0, power: float = 2 / 3, update_after_step: int = 0) -> None:
        self.kwargs = dict(decay=decay, use_ema_warmup=use_ema_warmup, inv_gamma=inv_gamma, power=power, update_after_step=update_after_step)
        self.ema: EMAModel | None = None
        self._pending_state: dict | None = None
        self._last_step = -1

    @property
    def state_key(self) -> str:
        # fixed key: checkpoints load whatever subclass/arguments restore them
        return "ema"

    def _params(self, pl_module):
        return [p for p in pl_module.base_unet.parameters() if p.requires_grad]

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.ema is None:
            self.ema = EMAModel(self._params(pl_module), **self.kwargs)
            if self._pending_state is not None:
                self.ema.load_state_dict(self._pending_state)
                self._pending_state = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.ema.to(pl_module.device)
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self._last_step:  # an optimizer step happened (accumulation-aware)
            self.ema.step(self._params(pl_module))
            self._last_step = trainer.global_step

    @contextmanager
    def swapped(self, pl_module):
        """Temporarily load EMA weights into the UNet."""
        params = self._params(pl_module)
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def state_dict(self) -> dict:
        return self.ema.state_dict() if self.ema is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self.ema is None:  # restored before setup(): apply once the EMA exists
            self._pending_state = state_dict
        else:
            self.ema.load_state_dict(state_dict)

def ema_weights(trainer, pl_module):
    """Context manager: EMA weights in the UNet if an ``EMACallback`` is active, else no-op."""
    for cb in trainer.callbacks if trainer is not None else []:
        if isinstance(cb, EMACallback) and cb.ema is not None:
            return cb.swapped(pl_module)
    return nullcontext()
