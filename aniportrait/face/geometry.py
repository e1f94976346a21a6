"""MediaPipe's camera, head poses and the projection of canonical face meshes to 2-D landmarks.

Conventions (shared with the official AniPortrait code and the clip format):

* A canonical mesh lives in MediaPipe's pose-free metric face space (centimetres, +y up, +z towards
  the viewer). ``trans_mat`` (4x4) maps it into camera space; the camera looks down -z.
* The camera is MediaPipe's perspective camera: vertical field of view 63 degrees, near 1, far 10000.
* A 6-D pose is ``(rx, ry, rz, tx, ty, tz)``: extrinsic x-y-z Euler angles in degrees (scipy's
  ``from_euler('xyz')``) and a translation. A pose acts in the canonical frame, composed as
  ``trans_mat_ref @ M(pose6)``, as the official scripts do.
* Image sizes are ``(height, width)`` wherever a shape is meant; pixel coordinates are ``(x, y)`` with
  the origin at the top-left corner.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

__all__ = [
    "PerspectiveCamera",
    "pose6_to_matrix",
    "matrix_to_pose6",
    "relative_pose6",
    "compose_pose6",
    "project_points",
    "smooth_pose_sequence",
]


@dataclass(frozen=True)
class PerspectiveCamera:
    """MediaPipe's face-geometry camera (``PerspectiveCamera`` in its environment proto)."""

    vertical_fov_degrees: float = 63.0
    near: float = 1.0
    far: float = 10000.0

    def projection_matrix(self, aspect_ratio: float) -> np.ndarray:
        """The 4x4 matrix P with ``clip = [p, 1] @ P`` (row vectors), y flipped for a top-left origin.

        Built in float32 like MediaPipe's renderer and the official ``create_perspective_matrix``, so
        projections agree to the last bit of that precision.
        """
        m = np.zeros(16, dtype=np.float32)
        f = 1.0 / np.tan(np.pi / 180.0 * self.vertical_fov_degrees / 2.0)
        denom = 1.0 / (self.near - self.far)
        m[0] = f / aspect_ratio
        m[5] = -f  # the y flip: image rows grow downwards
        m[10] = (self.near + self.far) * denom
        m[11] = -1.0
        m[14] = self.far * self.near * denom
        return m.reshape(4, 4).T  # column-major storage, read as a matrix for row vectors

    def frustum(self, aspect_ratio: float) -> tuple[float, float, float, float]:
        """(left, right, bottom, top) of the near plane, as MediaPipe's geometry pipeline sets it up."""
        height = 2.0 * self.near * np.tan(0.5 * np.deg2rad(self.vertical_fov_degrees))
        width = aspect_ratio * height
        return -0.5 * width, 0.5 * width, -0.5 * height, 0.5 * height


DEFAULT_CAMERA = PerspectiveCamera()


def pose6_to_matrix(pose6: np.ndarray) -> np.ndarray:
    """(..., 6) Euler-xyz degrees + translation -> (..., 4, 4) rigid transforms."""
    pose6 = np.asarray(pose6, dtype=np.float64)
    lead = pose6.shape[:-1]
    flat = pose6.reshape(-1, 6)
    mats = np.tile(np.eye(4), (flat.shape[0], 1, 1))
    mats[:, :3, :3] = Rotation.from_euler("xyz", flat[:, :3], degrees=True).as_matrix()
    mats[:, :3, 3] = flat[:, 3:]
    return mats.reshape(*lead, 4, 4)


def matrix_to_pose6(matrix: np.ndarray) -> np.ndarray:
    """(..., 4, 4) transforms -> (..., 6) poses; the rotation part is orthonormalised first."""
    matrix = np.asarray(matrix, dtype=np.float64)
    lead = matrix.shape[:-2]
    flat = matrix.reshape(-1, 4, 4)
    # MediaPipe's matrices carry a scale close to 1 from its Procrustes fit; strip it before Euler angles.
    u, _, vt = np.linalg.svd(flat[:, :3, :3])
    rot = u @ vt
    euler = Rotation.from_matrix(rot).as_euler("xyz", degrees=True)
    return np.concatenate([euler, flat[:, :3, 3]], axis=-1).reshape(*lead, 6)


def relative_pose6(trans_mats: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Poses of ``trans_mats`` (T, 4, 4) relative to ``reference`` (4, 4): ``reference @ M(p_t) = T_t``."""
    rel = np.linalg.inv(np.asarray(reference, dtype=np.float64)) @ np.asarray(trans_mats, dtype=np.float64)
    return matrix_to_pose6(rel)


def compose_pose6(reference: np.ndarray, pose6: np.ndarray) -> np.ndarray:
    """``reference @ M(pose6)``: (4, 4) and (T, 6) -> (T, 4, 4)."""
    return np.asarray(reference, dtype=np.float64) @ pose6_to_matrix(pose6)


def project_points(
    points_3d: np.ndarray,
    trans_mat: np.ndarray,
    pose6: np.ndarray | None = None,
    image_size: tuple[int, int] = (512, 512),
    camera: PerspectiveCamera = DEFAULT_CAMERA,
) -> np.ndarray:
    """Project canonical meshes to pixel coordinates.

    points_3d: (T, N, 3) canonical meshes. trans_mat: (4, 4) shared by all frames, or (T, 4, 4).
    pose6: optional (T, 6) poses composed on the right (``trans_mat @ M(pose6)``).
    image_size: (height, width). Returns (T, N, 2) float64 pixel (x, y).
    """
    points_3d = np.asarray(points_3d, dtype=np.float64)
    height, width = image_size
    frames = points_3d.shape[0]
    trans = np.asarray(trans_mat, dtype=np.float64)
    if trans.ndim == 2:
        trans = np.broadcast_to(trans, (frames, 4, 4))
    if pose6 is not None:
        trans = trans @ pose6_to_matrix(np.asarray(pose6)[:frames])
    proj = camera.projection_matrix(width / height).astype(np.float64)
    homogeneous = np.concatenate([points_3d, np.ones((*points_3d.shape[:2], 1))], axis=-1)
    clip = homogeneous @ np.swapaxes(trans, 1, 2) @ proj  # (T, N, 4)
    ndc = clip[..., :2] / clip[..., 3:4]
    pixels = np.empty_like(ndc)
    pixels[..., 0] = (ndc[..., 0] + 1.0) * 0.5 * width
    pixels[..., 1] = (ndc[..., 1] + 1.0) * 0.5 * height
    return pixels


def smooth_pose_sequence(sequence: np.ndarray, window: int = 5) -> np.ndarray:
    """Centred moving mean over time, the window truncated at the ends (the official smoothing).

    Frame i averages frames ``max(0, i - window // 2) .. min(T - 1, i + window // 2)``; an even window
    therefore behaves like the next odd one, as in the official ``smooth_pose_seq``.
    """
    sequence = np.asarray(sequence, dtype=np.float64)
    length = sequence.shape[0]
    half = window // 2
    cumulative = np.concatenate([np.zeros((1, *sequence.shape[1:])), np.cumsum(sequence, axis=0)], axis=0)
    index = np.arange(length)
    start = np.maximum(0, index - half)
    end = np.minimum(length, index + half + 1)
    counts = (end - start).reshape(-1, *([1] * (sequence.ndim - 1)))
    return (cumulative[end] - cumulative[start]) / counts
