"""Pose images: landmarks drawn with the official AniPortrait visualizer's look.

The official ``FaceMeshVisualizer.draw_landmarks`` always draws on a 512x512 black canvas: every point is
stored as a float32 normalised coordinate, points outside [0, 1] are dropped, each kept point maps to
pixel ``min(floor(v * 512), 511)``, and each connection whose two ends survive becomes a 2-px
``cv2.line`` in the group's colour. The canvas is then resized (bilinear) to the requested size. We
reproduce that bit for bit (``tests/face/test_drawing.py``), without MediaPipe's protobuf objects.
"""

from __future__ import annotations

import cv2
import numpy as np

from aniportrait.face.topology import DRAW_GROUPS

__all__ = ["draw_landmarks", "draw_landmark_sequence", "OFFICIAL_CANVAS_SIZE"]

OFFICIAL_CANVAS_SIZE = 512
_EDGES = np.array([edge for _, _, edges in DRAW_GROUPS for edge in edges], dtype=np.int64)
_COLOURS = [colour for _, colour, edges in DRAW_GROUPS for _ in edges]


def _canvas_pixels(normalised: np.ndarray, canvas_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (N, 2) -> integer canvas pixels and a keep mask, as MediaPipe's drawing utils do."""
    values = normalised.astype(np.float32).astype(np.float64)  # the protobuf stores float32
    keep = np.all((values >= 0.0) & ((values <= 1.0) | np.isclose(values, 1.0, rtol=1e-9, atol=0.0)), axis=1)
    pixels = np.minimum(np.floor(values * canvas_size), canvas_size - 1)
    pixels = np.where(np.isfinite(pixels), pixels, 0).astype(np.int64)
    return pixels, keep


def draw_landmarks(
    landmarks: np.ndarray,
    image_size: tuple[int, int] = (512, 512),
    normalized: bool = False,
    canvas_size: int = OFFICIAL_CANVAS_SIZE,
    thickness: int = 2,
) -> np.ndarray:
    """Draw one face as a pose image.

    landmarks: (N, >=2) with N >= 468; pixel (x, y) in an image of ``image_size``, or normalised to
    [0, 1] with ``normalized=True``. image_size: (height, width) of the returned uint8 (H, W, 3) image.
    canvas_size: size of the square canvas the lines are drawn on (512 in the official visualizer).
    """
    height, width = image_size
    xy = np.asarray(landmarks, dtype=np.float64)[:, :2]
    if not normalized:
        xy = xy / np.array([width, height], dtype=np.float64)
    pixels, keep = _canvas_pixels(xy, canvas_size)
    canvas = np.zeros((canvas_size, canvas_size, 3), dtype=np.uint8)
    for (start, end), colour in zip(_EDGES, _COLOURS):
        if keep[start] and keep[end]:
            cv2.line(canvas, tuple(map(int, pixels[start])), tuple(map(int, pixels[end])), colour, thickness)
    if (height, width) != (canvas_size, canvas_size):
        canvas = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_LINEAR)
    return canvas


def draw_landmark_sequence(landmarks: np.ndarray, image_size: tuple[int, int], **kwargs) -> np.ndarray:
    """(T, N, 2) pixel landmarks -> (T, H, W, 3) uint8 pose images."""
    return np.stack([draw_landmarks(frame, image_size, **kwargs) for frame in landmarks])
