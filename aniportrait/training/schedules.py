"""Learning-rate schedules referenced from configs (``_target_``)."""

from __future__ import annotations

import math

import torch

__all__ = ["warmup_cosine", "warmup_constant"]


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0):
    """Linear warm-up, then cosine decay to ``min_ratio`` of the base learning rate at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_constant(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0):
    """Linear warm-up, then the base learning rate (the official AniPortrait recipe: constant)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / warmup_steps if warmup_steps and step < warmup_steps else 1.0
    )
