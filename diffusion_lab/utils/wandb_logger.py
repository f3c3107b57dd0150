"""Lightning's ``WandbLogger`` without the deprecated ``anonymous`` setting it always passes
(``anonymous=None``), which made wandb print "The anonymous setting has no effect" on every run."""

from __future__ import annotations

from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger


class WandbLogger(_LightningWandbLogger):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
