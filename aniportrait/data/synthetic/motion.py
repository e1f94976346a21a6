"""Head motion, camera placement and blinks of a synthetic clip.

Head pose is a 6-D pose per frame (Euler xyz degrees, translation in cm; ``aniportrait.face.geometry``)
acting in the canonical face frame: ``trans_mat[t] = placement @ M(pose6[t])``. Each degree of freedom
is a sum of three slow sinusoids (0.08-0.6 Hz, random phases) bounded by ``POSE_LIMITS``, and the pitch
adds a small nod that follows the smoothed speech envelope (the head dips on stressed syllables).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d

from aniportrait.face.geometry import DEFAULT_CAMERA

__all__ = ["head_motion", "camera_placement", "blink_track", "POSE_LIMITS"]

# Largest |value| of each pose component: pitch, yaw, roll (degrees); x, y, z translation (cm).
POSE_LIMITS = np.array((8.0, 15.0, 5.0, 1.0, 0.8, 1.5))
NOD_DEGREES = 2.0  # pitch added at full envelope; with POSE_LIMITS pitch stays within +-10 degrees
NOD_SMOOTHING_S = 0.12
BLINK_INTERVAL_S = (2.0, 6.0)
BLINK_DURATION_S = (0.12, 0.2)
BLINK_CLOSING_FRACTION = 0.4  # lids close faster than they open


def head_motion(rng: np.random.Generator, num_frames: int, fps: float, envelope: np.ndarray) -> np.ndarray:
    """(T, 6) absolute head poses: bounded slow sinusoids plus a speech-driven nod on the pitch."""
    times = np.arange(num_frames) / fps
    frequencies = np.exp(rng.uniform(np.log(0.08), np.log(0.6), size=(6, 3)))
    phases = rng.uniform(0.0, 2.0 * np.pi, size=(6, 3))
    shares = rng.dirichlet(np.ones(3), size=6) * rng.uniform(0.4, 1.0, size=(6, 1))  # each row sums to <= 1
    waves = np.sin(2.0 * np.pi * frequencies[:, :, None] * times + phases[:, :, None])  # (6, 3, T)
    pose6 = (POSE_LIMITS[:, None] * np.sum(shares[:, :, None] * waves, axis=1)).T  # (T, 6)
    nod = gaussian_filter1d(np.asarray(envelope, dtype=np.float64), NOD_SMOOTHING_S * fps, mode="nearest")
    pose6[:, 0] += NOD_DEGREES * nod  # a positive x rotation tips the head forwards
    return pose6


def camera_placement(neutral: np.ndarray, face_fraction: float) -> np.ndarray:
    """(4, 4) canonical -> camera transform that centres the face and makes it ``face_fraction`` of the
    frame's height (chin to forehead), seen head-on by MediaPipe's camera."""
    top, bottom = neutral[:, 1].max(), neutral[:, 1].min()
    visible_height_per_cm = 2.0 * np.tan(np.deg2rad(DEFAULT_CAMERA.vertical_fov_degrees) / 2.0)
    depth = (top - bottom) / (face_fraction * visible_height_per_cm) + neutral[:, 2].mean()
    placement = np.eye(4)
    placement[:3, 3] = (-neutral[:, 0].mean(), -0.5 * (top + bottom), -depth)
    return placement


def blink_track(rng: np.random.Generator, num_frames: int, fps: float) -> np.ndarray:
    """(T,) lid closure in [0, 1] at each frame's time: blinks every 2-6 s, each 120-200 ms long."""
    times = np.arange(num_frames) / fps
    closure = np.zeros(num_frames)
    start = rng.uniform(0.3, 3.0)
    while start < times[-1] + 1.0 / fps:
        duration = rng.uniform(*BLINK_DURATION_S)
        phase = (times - start) / duration
        closing = np.clip(phase / BLINK_CLOSING_FRACTION, 0.0, 1.0)
        opening = np.clip((phase - BLINK_CLOSING_FRACTION) / (1.0 - BLINK_CLOSING_FRACTION), 0.0, 1.0)
        shape = np.where(phase < BLINK_CLOSING_FRACTION, 0.5 - 0.5 * np.cos(np.pi * closing),
                         0.5 + 0.5 * np.cos(np.pi * opening))
        closure = np.maximum(closure, np.where((phase >= 0.0) & (phase < 1.0), shape, 0.0))
        start += rng.uniform(*BLINK_INTERVAL_S)
    return closure
