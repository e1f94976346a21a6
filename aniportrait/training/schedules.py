"""Learning-rate schedules referenced from configs (``_target_``)."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["warmup_cosine", "warmup_constant", "with_scheduler"]


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


def with_scheduler(module, optimizer: torch.optim.Optimizer, scheduler_config) -> Any:
    """What a LightningModule's ``configure_optimizers`` returns: ``optimizer`` alone, or with the step-wise schedule
    built from ``scheduler_config`` (a ``_target_`` config of one of the schedules above; its ``total_steps`` is the
    module's trainer's ``max_steps``, else the steps Lightning estimates for the run)."""
    if not scheduler_config:
        return optimizer
    import hydra

    trainer = module.trainer
    total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
    scheduler = hydra.utils.instantiate(scheduler_config, optimizer=optimizer, total_steps=total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
