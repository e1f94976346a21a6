"""Ablations of a trained stage B: cut one conditioning path of a pipeline and see what it was doing.

    with ablated(pipeline, "pose_guider"):     # PoseGuider features zeroed: the UNet sees no pose
        frames = pipeline(reference, poses)
    with ablated(pipeline, "reference"):       # empty reference bank: plain self-attention, no ReferenceNet tokens
    with ablated(pipeline, "motion_modules"):  # the motion modules skipped: stage 1 alone (frames independent)

Each cut removes exactly its path and leaves the weights untouched (tests/pipelines/test_ablation.py checks that
outputs change when, and only when, the cut path carried something). The CLIP image embedding is not cut by
``reference``: it is the cross-attention conditioning, a separate path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from aniportrait.errors import AniPortraitError

__all__ = ["ABLATIONS", "ablated"]

ABLATIONS = ("pose_guider", "reference", "motion_modules")


class _ZeroPoseFeatures(nn.Module):
    """Stands in for a PoseGuider: its features, zeroed (same shapes, dtypes and devices)."""

    def __init__(self, pose_guider: nn.Module):
        super().__init__()
        self.pose_guider = pose_guider

    def forward(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        return [torch.zeros_like(feature) for feature in self.pose_guider(*args, **kwargs)]


@contextlib.contextmanager
def ablated(pipeline: Any, *names: str) -> Iterator[Any]:
    """Within the block, ``pipeline`` (a :class:`~aniportrait.pipelines.pose2video.Pose2VideoPipeline`) runs with
    the paths ``names`` (of :data:`ABLATIONS`) cut; everything is restored afterwards."""
    unknown = sorted(set(names) - set(ABLATIONS))
    if unknown:
        raise AniPortraitError(f"ablations {unknown} are unknown; expected some of {list(ABLATIONS)}")
    restore: list[tuple[Any, str, Any]] = []
    try:
        if "pose_guider" in names:
            restore.append((pipeline, "pose_guider", pipeline.pose_guider))
            pipeline.pose_guider = _ZeroPoseFeatures(pipeline.pose_guider)
        if "reference" in names:
            control = pipeline.reference_control
            pipeline.forget_reference()  # a kept reference pass of an earlier call must not be read either
            # the bank is never filled and never read: the denoising UNet's self-attention sees its own tokens only
            restore.append((pipeline, "_write_reference", pipeline.__dict__.get("_write_reference")))
            pipeline._write_reference = lambda *args, **kwargs: control.clear()
            restore.append((control, "read", control.__dict__.get("read")))
            control.read = lambda *args, **kwargs: None
        if "motion_modules" in names:
            for block in (*pipeline.denoising_unet.down_blocks, pipeline.denoising_unet.mid_block,
                          *pipeline.denoising_unet.up_blocks):
                if getattr(block, "motion_modules", None) is not None:
                    restore.append((block, "motion_modules", block.motion_modules))
                    block.motion_modules = None
        yield pipeline
    finally:
        if "reference" in names:
            pipeline.forget_reference()
        for owner, attribute, value in reversed(restore):
            if value is None and attribute in ("_write_reference", "read"):
                delattr(owner, attribute)  # back to the class's method
            else:
                setattr(owner, attribute, value)
