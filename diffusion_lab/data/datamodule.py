"""One LightningDataModule for every data source: split, batch, load."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from diffusion_lab.utils.errors import ConfigError


class DiffusionDataModule(pl.LightningDataModule):
    """Wraps a built data set.

    Args:
        dataset: any ``Dataset`` of dicts with ``pixel_values``.
        batch_size: the *global* batch: each of the ``world_size`` processes loads
            ``batch_size // world_size`` (it must divide).
        val_fraction: held-out share for ``val/loss`` (a fixed, seeded split; 0 = no validation).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def per_device_batch_size(self) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is the global batch and must divide by the number of "
                f"processes ({world} = trainer.devices x trainer.num_nodes); use e.g. data.batch_size="
                f"{max(world, self.batch_size // world * world)}."
            )
        return self.batch_size // world

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        n = len(self.dataset)
        n_val = int(round(n * self.val_fraction)) if self.val_fraction > 0 else 0
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.val_set = Subset(self.dataset, perm[:n_val]) if n_val else None
        self.train_set = Subset(self.dataset, perm[n_val:]) if n_val else self.dataset

    def _loader(self, ds: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=self.per_device_batch_size,
            shuffle=shuffle,
            drop_last=drop_last and len(ds) >= self.per_device_batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, shuffle=False, drop_last=False) if self.val_set is not None else []

    def sample_batch(self, n: int) -> dict:
        """The first ``n`` training items as one batch (noising strips, conditioning for grids)."""
        self.setup()
        items = [self.train_set[i] for i in range(min(n, len(self.train_set)))]
        return torch.utils.data.default_collate(items)
