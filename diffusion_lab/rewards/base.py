"""The ``Reward`` interface (``reward=``).

    class Brightness(Reward):
        name = "brightness"
        def __call__(self, images, prompts=None):
            return images.mean(dim=(1, 2, 3))      # [N]

and ``conf/reward/brightness.yaml`` with ``_target_: my_package.Brightness``.
"""

from __future__ import annotations

from typing import Sequence

import torch


class Reward:
    """A scorer of final images: ``__call__(images [N, C, H, W] in [-1, 1], prompts: N strings or
    None for unconditional models) -> [N]`` float tensor, higher is better. ``name`` labels logs and
    messages. Rewards that hold networks move them with ``to(device)`` (the method calls it at setup)."""

    name: str = "reward"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device: torch.device | str) -> "Reward":
        for value in vars(self).values():
            if isinstance(value, torch.nn.Module):
                value.to(device)
        return self
