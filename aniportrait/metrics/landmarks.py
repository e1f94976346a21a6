"""Landmark and mesh metrics for the audio-to-landmark stage.

Units follow the inputs: meshes in MediaPipe's metric canonical space are in centimetres; poses are
(degrees, degrees, degrees, cm, cm, cm).

* LVE (lip vertex error, as in VOCA/FaceFormer): per frame the largest L2 error over the lip vertices,
  averaged over frames.
* MVE (mean vertex error): L2 error averaged over all vertices and frames.
* Mouth opening: the inner-lip gap |v13 - v14|; its Pearson correlation with the ground truth measures
  whether the mouth moves with the speech (a model that learned nothing scores about 0).
* Pose L1: mean absolute error per pose component.
* LMD (landmark distance) on 2-D landmarks found in videos: per frame the mean Euclidean distance over
  the face mesh (468 points) or the mouth (the 40 lip vertices), in pixels of the compared frames.
* Blendshape (expression) error: per frame the mean absolute difference of MediaPipe's 51 expression
  scores (the ``_neutral`` score at index 0 left out: it is not an expression).
"""

from __future__ import annotations

import numpy as np
import torch

from aniportrait.face.topology import LIP_VERTICES, LOWER_INNER_LIP_CENTRE, UPPER_INNER_LIP_CENTRE

__all__ = [
    "lip_vertex_error",
    "mean_vertex_error",
    "mouth_opening",
    "pearson",
    "pose_l1",
    "landmark_distance",
    "landmark_distance_per_frame",
    "blendshape_error_per_frame",
    "FACE_MESH_POINTS",
    "MOUTH_POINTS",
]

_LIPS = torch.tensor(LIP_VERTICES)
FACE_MESH_POINTS = tuple(range(468))
MOUTH_POINTS = LIP_VERTICES


def _mask(frames: int, mask, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(frames, dtype=torch.bool, device=device)
    return torch.as_tensor(mask, device=device).reshape(-1).bool()


def lip_vertex_error(pred: torch.Tensor, target: torch.Tensor, mask=None) -> torch.Tensor:
    """pred, target: (..., 468, 3) -> mean over frames of max lip-vertex L2 error."""
    errors = (pred[..., _LIPS, :] - target[..., _LIPS, :]).norm(dim=-1).amax(dim=-1).reshape(-1)
    return errors[_mask(errors.numel(), mask, errors.device)].mean()


def mean_vertex_error(pred: torch.Tensor, target: torch.Tensor, mask=None) -> torch.Tensor:
    errors = (pred - target).norm(dim=-1).mean(dim=-1).reshape(-1)
    return errors[_mask(errors.numel(), mask, errors.device)].mean()


def mouth_opening(mesh: torch.Tensor | np.ndarray):
    """(..., 468, 3) -> (...) inner-lip gap."""
    if isinstance(mesh, np.ndarray):
        return np.linalg.norm(mesh[..., UPPER_INNER_LIP_CENTRE, :] - mesh[..., LOWER_INNER_LIP_CENTRE, :], axis=-1)
    return (mesh[..., UPPER_INNER_LIP_CENTRE, :] - mesh[..., LOWER_INNER_LIP_CENTRE, :]).norm(dim=-1)


def pearson(x, y, eps: float = 1e-8) -> float:
    """Pearson correlation of two 1-D sequences; 0.0 when either is constant (nothing to correlate)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    if denominator < eps:
        return 0.0
    return float((x * y).sum() / denominator)


def pose_l1(pred: torch.Tensor, target: torch.Tensor, mask=None) -> torch.Tensor:
    """(..., 6) -> mean absolute error over frames and components."""
    errors = (pred - target).abs().mean(dim=-1).reshape(-1)
    return errors[_mask(errors.numel(), mask, errors.device)].mean()


def landmark_distance(pred: np.ndarray, target: np.ndarray, indices=None) -> float:
    """Mean 2-D landmark distance (LMD) in the inputs' units; ``indices`` restricts to a region."""
    pred = np.asarray(pred)[..., :2]
    target = np.asarray(target)[..., :2]
    if indices is not None:
        pred, target = pred[..., list(indices), :], target[..., list(indices), :]
    return float(np.linalg.norm(pred - target, axis=-1).mean())


def landmark_distance_per_frame(pred: np.ndarray, target: np.ndarray, indices=FACE_MESH_POINTS) -> np.ndarray:
    """(T, N, >=2) landmarks (pixels) -> (T,) mean 2-D distance over the points ``indices``."""
    pred = np.asarray(pred, dtype=np.float64)[:, list(indices), :2]
    target = np.asarray(target, dtype=np.float64)[:, list(indices), :2]
    return np.linalg.norm(pred - target, axis=-1).mean(axis=-1)


def blendshape_error_per_frame(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(T, 52) MediaPipe blendshape scores -> (T,) mean absolute error over the 51 expressions."""
    return np.abs(np.asarray(pred, dtype=np.float64)[:, 1:] - np.asarray(target, dtype=np.float64)[:, 1:]).mean(axis=-1)
