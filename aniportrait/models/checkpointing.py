"""Gradient checkpointing of a UNet, everywhere or at chosen resolution levels.

Checkpointing never changes what a UNet computes, only what it keeps for the backward: a checkpointed layer drops its
activations and runs its forward again inside the backward. In an SD-1.5 UNet the activations are largest at the full
latent resolution while the FLOPs spread about evenly over the first three levels (channels double as the side
halves), so checkpointing only the top levels buys most of the memory for part of the recomputation.

Levels: 0 is the full latent resolution (``down_blocks[0]`` and ``up_blocks[-1]``), ``len(down_blocks) - 1`` the
deepest, which also holds the mid block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from aniportrait.errors import AniPortraitError


def parse_checkpointing(value: Any, key: str = "model.gradient_checkpointing") -> bool | tuple[int, ...]:
    """``true`` / ``false``, or a list of resolution levels (``[0, 1]``) whose layers run under checkpointing."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    levels = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    if levels is not None and all(isinstance(level, int) and not isinstance(level, bool) for level in levels):
        return tuple(sorted(set(levels))) if levels else False
    raise AniPortraitError(f"{key}={value!r}: use true (every level), false, or a list of UNet resolution levels "
                           "such as [0, 1] (0 = the full latent resolution)")


def level_blocks(unet: nn.Module, level: int) -> list[nn.Module]:
    """The blocks of ``unet`` at one resolution level (the mid block belongs to the deepest)."""
    depth = len(unet.down_blocks)
    blocks = [unet.down_blocks[level], unet.up_blocks[depth - 1 - level]]
    if level == depth - 1 and getattr(unet, "mid_block", None) is not None:
        blocks.append(unet.mid_block)
    return blocks


def set_gradient_checkpointing(unet: nn.Module, setting: bool | Sequence[int],
                               key: str = "model.gradient_checkpointing") -> None:
    """Switch checkpointing of ``unet`` (a diffusers UNet or ours) on everywhere, off, or on at some levels only."""
    levels = parse_checkpointing(setting, key)
    if not levels:
        unet.disable_gradient_checkpointing()
        return
    unet.enable_gradient_checkpointing()
    if levels is True:
        return
    depth = len(unet.down_blocks)
    outside = [level for level in levels if not 0 <= level < depth]
    if outside:
        raise AniPortraitError(f"{key} names levels {outside}; this UNet has levels 0..{depth - 1} "
                               "(0 = the full latent resolution)")
    for level in range(depth):
        if level in levels:
            continue
        for block in level_blocks(unet, level):
            for module in block.modules():  # the block and everything in it (attention transformers included)
                if hasattr(module, "gradient_checkpointing"):
                    module.gradient_checkpointing = False


def checkpoint_without_rng_state(module: nn.Module, *args: Any) -> Any:
    """Checkpointing that neither saves nor restores the RNG state, for CUDA graph capture (which forbids reading the
    generator's offset). The same function as diffusers' default wherever the checkpointed layers draw no random
    numbers: :func:`random_modules` lists those that would."""
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=False)


def set_checkpoint_function(unet: nn.Module, function: Any) -> None:
    """Run ``unet``'s checkpointed layers through ``function`` without changing which layers are checkpointed."""
    for module in unet.modules():
        if hasattr(module, "gradient_checkpointing"):
            module._gradient_checkpointing_func = function


def random_modules(*networks: nn.Module) -> list[str]:
    """Modules that draw random numbers in training mode (dropout with p > 0), as ``ClassName(p)``."""
    found = []
    for network in networks:
        for module in network.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
                found.append(f"{type(module).__name__}(p={module.p})")
    return found
