"""Accelerated mode (``keyframe_interval=k``, the official ``-acc --fi_step``): only frames 0, k, 2k, ... and the last
one are generated; the frames between neighbouring keyframes come from a pluggable interpolator (config group
``interpolator``: anything with ``_target_`` that is called as ``interpolator(first, last, fractions)``); the
built-in default warps both keyframes along OpenCV Farneback optical flow and blends them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import cv2
import numpy as np
from omegaconf import DictConfig

from aniportrait.errors import AniPortraitError

__all__ = ["FrameInterpolator", "LinearInterpolator", "FlowInterpolator", "build_interpolator", "keyframe_indices",
           "fill_between_keyframes"]



class FrameInterpolator(Protocol):
    """Frames between two generated keyframes (the ``interpolator`` config group's ``_target_``)."""

    def __call__(self, first: np.ndarray, last: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
        """first, last: (H, W, 3) uint8; fractions in (0, 1), the time of each wanted frame between them.
        Returns (len(fractions), H, W, 3) uint8."""
        ...


class LinearInterpolator:
    """Cross-fade: cheap and exact for static regions, ghosts where things move."""

    def __call__(self, first: np.ndarray, last: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
        weights = np.asarray(fractions, dtype=np.float32)[:, None, None, None]
        return np.round((1 - weights) * first[None] + weights * last[None]).astype(np.uint8)


class FlowInterpolator:
    """Warp both keyframes along dense optical flow (OpenCV Farneback) to time t and blend them.

    With the flows F01 (first -> last) and F10, pixel q at time t sits near ``q + t F10(q)`` in the first frame and
    ``q + (1 - t) F01(q)`` in the last (linear motion); each is sampled there and the two are mixed (1 - t) : t.
    """

    def __init__(self, levels: int = 4, window: int = 21, iterations: int = 3):
        self.levels, self.window, self.iterations = levels, window, iterations

    def _flow(self, source: np.ndarray, target: np.ndarray) -> np.ndarray:
        """(H, W, 2): where each pixel of ``source`` moved to in ``target``."""
        return cv2.calcOpticalFlowFarneback(cv2.cvtColor(source, cv2.COLOR_RGB2GRAY), cv2.cvtColor(target, cv2.COLOR_RGB2GRAY),
                                            None, 0.5, self.levels, self.window, self.iterations, 5, 1.2, 0)

    def __call__(self, first: np.ndarray, last: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
        forward, backward = self._flow(first, last), self._flow(last, first)
        height, width = first.shape[:2]
        grid = np.stack(np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)), axis=-1)
        frames = []
        for t in fractions:
            from_first = cv2.remap(first, (grid + t * backward).astype(np.float32), None, cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REPLICATE)
            from_last = cv2.remap(last, (grid + (1 - t) * forward).astype(np.float32), None, cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_REPLICATE)
            frames.append(np.round((1 - t) * from_first.astype(np.float32) + t * from_last.astype(np.float32)))
        return np.stack(frames).astype(np.uint8)


def build_interpolator(spec: Any) -> FrameInterpolator:
    """None -> :class:`FlowInterpolator`; a ``{_target_: ...}`` config -> instantiated; a callable -> itself."""
    if spec is None:
        return FlowInterpolator()
    if isinstance(spec, (Mapping, DictConfig)):
        import hydra

        if "_target_" not in spec:
            raise AniPortraitError(f"interpolator config {dict(spec)} has no _target_: name a class called as "
                                   "interpolator(first, last, fractions), e.g. aniportrait.inference.FlowInterpolator")
        spec = hydra.utils.instantiate(spec)
    if not callable(spec):
        raise AniPortraitError(f"interpolator {spec!r} is not callable as interpolator(first, last, fractions)")
    return spec


def keyframe_indices(num_frames: int, interval: int) -> np.ndarray:
    """Frames to generate: 0, k, 2k, ... and always the last one, so interpolation covers every frame."""
    if interval < 1:
        raise AniPortraitError(f"keyframe_interval={interval}: use 1 (every frame generated) or more")
    indices = np.arange(0, num_frames, interval)
    return indices if indices[-1] == num_frames - 1 else np.append(indices, num_frames - 1)


def fill_between_keyframes(keys: Sequence[int], keyframes: Iterable[np.ndarray],
                           interpolator: FrameInterpolator) -> Iterator[np.ndarray]:
    """Keyframes (in order, for frames ``keys``) -> every frame from keys[0] to keys[-1]."""
    previous_index, previous = None, None
    for index, frame in zip(keys, keyframes):
        if previous is not None and index - previous_index > 1:
            fractions = (np.arange(previous_index + 1, index) - previous_index) / (index - previous_index)
            yield from interpolator(previous, frame, fractions)
        yield frame
        previous_index, previous = int(index), frame

