"""Rewards (``reward=``, ``conf/reward/``): what ``method=grpo`` maximises.

A reward scores final images against their prompts: ``reward(images [N, C, H, W] in [-1, 1],
prompts: list[str] | None) -> [N]`` (higher is better; no gradient is needed, GRPO only ranks
samples within a group). ``base.Reward`` is the interface; adding one is a subclass with
``__call__`` and a ``conf/reward/<name>.yaml`` naming it (README, "Reward fine-tuning").
"""

from diffusion_lab.rewards.base import Reward

__all__ = ["Reward"]
