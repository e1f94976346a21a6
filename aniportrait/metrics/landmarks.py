"""Landmark and mesh metrics for the audio-to-landmark stage.

Units follow the inputs: meshes in MediaPipe's metric canonical space are in centimetres; poses are
(degrees, degrees, degrees, cm, cm, cm).

* LVE (lip vertex error, as in VOCA/FaceFormer): per frame the largest L2 error over the lip vertices,
  averaged over frames.
* MVE (mean vertex error): L2 error averaged over all vertices and frames.
* Mouth opening: the inner-lip gap |v13 - v14|; its Pearson correlation with the ground truth measures
  whether the mouth moves with the speech (a model that learned nothing scores about 0).
* Pose L1: mean absolute error per pose component.
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
]

_LIPS = torch.tensor(LIP_VERTICES)


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
