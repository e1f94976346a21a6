"""Context windows: a video longer than the motion modules' reach is denoised in overlapping windows of frames,
and at every step the windows' per-frame predictions are combined into one.

Two schedules:

* ``blended`` (the project's): windows in order, neighbours sharing ``context_overlap`` frames, the last one ending
  at the last frame (no wrap-around); each window's predictions are weighted by a linear ramp over the overlaps,
  normalised per frame, so a window border is a gradual hand-over (no seam). ``context_frames="auto"`` picks the
  fewest windows the motion modules allow.
* ``uniform`` (the official ``src/pipelines/context.py`` as ``pipeline_pose2vid_long.py`` calls it: step 0,
  stride 1, closed loop): windows start every ``context_frames - context_overlap`` frames, the last ones wrapping
  around to the start of the video; each frame's predictions are averaged with equal weights over the windows
  that hold it. With classifier-free guidance off the official loop adds the predictions without dividing by their
  count, and so does this schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aniportrait.errors import AniPortraitError

__all__ = ["ContextSchedule", "CONTEXT_SCHEDULES", "context_windows", "uniform_context_windows", "window_weights",
           "context_schedule"]

CONTEXT_SCHEDULES = ("blended", "uniform")


def context_windows(num_frames: int, context_frames: int | str = 16, context_overlap: int = 4,
                    max_frames: int = 32) -> list[slice]:
    """The blended schedule's windows covering ``range(num_frames)``, neighbours sharing ``context_overlap`` frames
    (more for the last, which ends at the last frame).

    ``context_frames`` is the window length, or ``"auto"``: the fewest windows of at most ``max_frames`` (the
    motion modules' position limit) with at least ``context_overlap`` shared frames, made as short as that
    allows, so overlaps are no larger than blending needs (48 frames: 2 windows of 26 instead of 4 of 16).
    """
    if num_frames < 1:
        raise AniPortraitError("pose-to-video needs at least one pose image")
    if context_frames == "auto":
        if not 0 <= context_overlap < max_frames:
            raise AniPortraitError(f"context_overlap={context_overlap}: need 0 <= context_overlap < {max_frames}")
        if num_frames <= max_frames:  # one window of the whole video, however short (no overlap to keep)
            return [slice(0, num_frames)]
        count = math.ceil((num_frames - context_overlap) / (max_frames - context_overlap))
        context_frames = math.ceil((num_frames + (count - 1) * context_overlap) / count)
    context_frames = _window_length(context_frames, context_overlap)
    if num_frames <= context_frames:
        return [slice(0, num_frames)]
    starts = list(range(0, num_frames - context_frames, context_frames - context_overlap)) + [num_frames - context_frames]
    return [slice(start, start + context_frames) for start in starts]


def uniform_context_windows(num_frames: int, context_frames: int = 16, context_overlap: int = 4) -> list[list[int]]:
    """The official ``uniform(step=0, num_frames, context_size, context_stride=1, context_overlap, closed_loop=True)``:
    frame indices of each window, in the official order (40 frames: 0-15, 12-27, 24-39, 36-39 + 0-11)."""
    if num_frames < 1:
        raise AniPortraitError("pose-to-video needs at least one pose image")
    if context_frames == "auto":
        raise AniPortraitError("context_frames=auto belongs to the blended schedule; the official (uniform) schedule "
                               "takes a frame count: context_frames=16 as official, or sampling=project")
    context_frames = _window_length(context_frames, context_overlap)
    if num_frames <= context_frames:
        return [list(range(num_frames))]
    # ordered_halving(0) = 0, so the official offset and padding vanish; stride 1 leaves one pass of windows
    return [[frame % num_frames for frame in range(start, start + context_frames)]
            for start in range(0, num_frames, context_frames - context_overlap)]


def _window_length(context_frames: int | str, context_overlap: int) -> int:
    try:
        context_frames = int(context_frames)
    except (TypeError, ValueError):
        raise AniPortraitError(f"context_frames={context_frames!r}: give a frame count (16 official) or auto") from None
    if context_frames < 1 or not 0 <= context_overlap < context_frames:
        raise AniPortraitError(f"context_frames={context_frames}, context_overlap={context_overlap}: need "
                               "context_frames >= 1 and 0 <= context_overlap < context_frames")
    return context_frames


def window_weights(length: int, context_overlap: int) -> torch.Tensor:
    """(length,) blending weights of a window's frames: a linear ramp over ``context_overlap + 1`` frames at
    both ends, flat in between (normalised per frame over all windows that cover it)."""
    position = torch.arange(length, dtype=torch.float32)
    return torch.minimum(torch.minimum(position + 1, length - position), torch.tensor(context_overlap + 1.0))


@dataclass(frozen=True)
class ContextSchedule:
    """The windows of one video and how their predictions combine: ``sum(weights[i] * prediction_i)`` over the
    windows holding a frame, then divided by how many hold it where ``average_by_count``."""

    windows: list[torch.Tensor]  # per window, its frame indices (n,) int64, in the order they are denoised
    weights: list[torch.Tensor] | None  # per window (n,) float32 multipliers; None: each prediction as it is
    average_by_count: bool  # divide each frame's sum by the number of windows that hold it

    def __len__(self) -> int:
        return len(self.windows)

    def counts(self, num_frames: int) -> torch.Tensor:
        """(num_frames,) how many windows hold each frame."""
        counts = torch.zeros(num_frames)
        for window in self.windows:
            counts[window] += 1
        return counts


def context_schedule(name: str, num_frames: int, context_frames: int | str, context_overlap: int,
                     guided: bool) -> ContextSchedule:
    """``name`` (``blended`` or ``uniform``) for a video of ``num_frames``; ``guided``: classifier-free guidance on."""
    if name == "blended":
        windows = context_windows(num_frames, context_frames, context_overlap)
        raw = [window_weights(window.stop - window.start, context_overlap) for window in windows]
        total = torch.zeros(num_frames)
        for window, weights in zip(windows, raw):
            total[window] += weights
        return ContextSchedule([torch.arange(window.start, window.stop) for window in windows],
                               [weights / total[window] for window, weights in zip(windows, raw)], False)
    if name == "uniform":
        windows = uniform_context_windows(num_frames, context_frames, context_overlap)
        return ContextSchedule([torch.tensor(window) for window in windows], None, average_by_count=guided)
    raise AniPortraitError(f"context schedule {name!r}: expected one of {', '.join(CONTEXT_SCHEDULES)}")
