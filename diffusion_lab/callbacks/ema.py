"""EMA of the trainable weights (diffusers ``EMAModel``), kept in checkpoints."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Literal

import pytorch_lightning as pl
import torch
from diffusers.training_utils import EMAModel

from diffusion_lab.components.fsdp import shard_like, whole

# where an EMA copy lives: beside the weights ("model": the module's device) or in host memory
EMADevice = Literal["model", "cpu"]


def trainable_named_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of what an EMA follows: the module's trainable parameters. Full training:
    every UNet weight; ``adapter=lora``: only the LoRA weights (UNet, and the text encoders' with
    ``adapter.train_text_encoder``). Names drop ``torch.compile``'s ``_orig_mod.``."""
    return [(n.replace("_orig_mod.", ""), p) for n, p in module.named_parameters() if p.requires_grad]


def ema_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of ``trainable_named_parameters``, in order (``inference.load_module`` copies
    a checkpoint's EMA back in this order)."""
    return [p for _, p in trainable_named_parameters(module)]


def ema_device(device: EMADevice, pl_module: pl.LightningModule) -> torch.device:
    return torch.device("cpu") if device == "cpu" else pl_module.device


def ema_step(ema: EMAModel, params: list[torch.nn.Parameter]) -> None:
    """``ema.step(params)`` with the EMA on another device than ``params`` (``device=cpu``): the
    weights are copied over first (``EMAModel.step`` mixes its tensors with the parameters in
    place, which needs one device). The copies keep ``requires_grad``, which ``step`` reads (a
    parameter without it is copied, not averaged)."""
    where = ema.shadow_params[0].device if ema.shadow_params else None
    if where is not None and params and params[0].device != where:
        params = [p.detach().to(where).requires_grad_(p.requires_grad) for p in params]
    ema.step(params)


class EMACallback(pl.Callback):
    """Keeps an exponential moving average of ``pl_module``'s trainable parameters (``ema_parameters``).

    ``decay`` is the final decay; with ``use_ema_warmup`` the decay ramps up as
    ``1 - (1 + step / inv_gamma) ** -power`` (diffusers' warmup), so early EMA is not stuck on the
    random init. Updated once per optimizer step; identical on every DDP rank because the
    gradients (hence the weights) are. Sampling and export use the EMA weights via ``ema_weights``
    (a LoRA run's export writes the EMA of its LoRA weights).

    ``device="cpu"`` keeps the copy in host memory, for models whose EMA does not fit beside them
    on the accelerator (each step then copies the trainable weights to the host); the numbers are
    those of ``device="model"``. ``foreach``: ``EMAModel``'s multi-tensor update (faster on GPUs).
    """

    def __init__(
        self,
        decay: float = 0.9999,
        use_ema_warmup: bool = True,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        update_after_step: int = 0,
        device: EMADevice = "model",
        foreach: bool = False,
    ) -> None:
        if device not in ("model", "cpu"):
            from diffusion_lab.utils.errors import ConfigError

            raise ConfigError(f"callbacks.ema.device={device!r}: use model (the EMA beside the weights) or cpu (in host memory).")
        self.kwargs = dict(decay=decay, use_ema_warmup=use_ema_warmup, inv_gamma=inv_gamma, power=power, update_after_step=update_after_step, foreach=foreach)
        self.device = device
        self.ema: EMAModel | None = None
        self._pending_state: dict | None = None
        self._last_step = -1

    @property
    def state_key(self) -> str:
        # fixed key: checkpoints load whatever subclass/arguments restore them
        return "ema"

    def _params(self, pl_module):
        return ema_parameters(pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        # built here, not in setup(): under trainer=fsdp the parameters are replaced by their
        # shards after setup() (configure_model), and the EMA follows the shards
        if self.ema is None:
            self.ema = EMAModel(self._params(pl_module), **self.kwargs)
            if self._pending_state is not None:
                self.load_state_dict(self._pending_state)
                self._pending_state = None
        self.ema.to(ema_device(self.device, pl_module))
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self._last_step:  # an optimizer step happened (accumulation-aware)
            ema_step(self.ema, self._params(pl_module))
            self._last_step = trainer.global_step

    @contextmanager
    def swapped(self, pl_module):
        """Temporarily load EMA weights into the module's trainable parameters."""
        params = self._params(pl_module)
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def state_dict(self) -> dict:
        """``EMAModel``'s state; sharded EMA weights (trainer=fsdp) are gathered whole (a
        collective: every rank writes a checkpoint), so the checkpoint resumes on any world size."""
        if self.ema is None:
            return {}
        state = self.ema.state_dict()
        state["shadow_params"] = [whole(p) for p in state["shadow_params"]]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self.ema is None:  # restored before on_fit_start(): applied once the EMA exists
            self._pending_state = state_dict
            return
        like = list(self.ema.shadow_params)
        self.ema.load_state_dict(state_dict)
        # whole tensors back into this run's shards (each rank keeps its slice)
        self.ema.shadow_params = [shard_like(full, p) for full, p in zip(self.ema.shadow_params, like)]


def ema_weights(trainer, pl_module):
    """Context manager: EMA weights in the module if an ``EMACallback`` is active, else no-op."""
    for cb in trainer.callbacks if trainer is not None else []:
        if isinstance(cb, EMACallback) and cb.ema is not None:
            return cb.swapped(pl_module)
    return nullcontext()
