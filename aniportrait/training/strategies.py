"""Lightning strategies built from plain config values (``conf/trainer/fsdp.yaml``)."""

from __future__ import annotations

import importlib

from pytorch_lightning.strategies import FSDPStrategy

__all__ = ["fsdp"]


def _classes(paths: list[str]) -> set[type]:
    out = set()
    for path in paths:
        module, _, name = path.rpartition(".")
        out.add(getattr(importlib.import_module(module), name))
    return out


def fsdp(wrap_modules: list[str], checkpoint_modules: list[str] | None = None, sharding_strategy: str = "FULL_SHARD",
         state_dict_type: str = "full", cpu_offload: bool = False, **kwargs) -> FSDPStrategy:
    """FSDP wrapping each named module class in its own shard unit (e.g. the UNets' transformer and resnet
    blocks), optionally with activation checkpointing of ``checkpoint_modules``. ``use_orig_params`` keeps
    frozen and trainable parameters in one model (stage 1 freezes the VAE and CLIP; stage 2 all but the
    motion modules)."""
    return FSDPStrategy(
        auto_wrap_policy=_classes(wrap_modules),
        activation_checkpointing_policy=_classes(checkpoint_modules) if checkpoint_modules else None,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        cpu_offload=cpu_offload,
        use_orig_params=True,
        **kwargs,
    )
