"""Procedural expressions of the 468-vertex mesh: jaw opening, lip spread and pucker, blinks.

All offsets live in the canonical, pose-free face space (cm, +y up, +z towards the viewer), so
``mesh3d = neutral + offsets`` is what MediaPipe's face-geometry pipeline would report for the face.

* Jaw: lower-face vertices rotate about a horizontal axis through the jaw joints (behind the cheeks at
  ear height) by ``jaw_open x JAW_MAX_DEGREES``. Each vertex follows with a weight that is 1 on the lower
  lip and chin, 0 on the upper lip, nose and everything above, and harmonic (smooth) in between over the
  mesh graph, so the cheeks and the jaw line stretch smoothly. The upper lip lifts a little.
* Spread / pucker: the mouth region (a Gaussian around the mouth) scales horizontally about the mouth
  centre, outwards for spread; inwards, vertically and forwards for pucker.
* Blinks: the upper-lid margin moves down to a meeting line a quarter of the way up from the lower
  lid, which rises to meet it, closing the eye opening completely at ``blink = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.sparse
import scipy.sparse.linalg

from aniportrait.face.template import load_face_template
from aniportrait.face.topology import (
    DRAW_GROUPS,
    INNER_LIP_POLYGON,
    LEFT_LOWER_LID,
    LEFT_UPPER_LID,
    MOUTH_CORNERS,
    RIGHT_LOWER_LID,
    RIGHT_UPPER_LID,
)

__all__ = ["FaceRig", "build_rig", "express", "jaw_rotation_offsets", "JAW_MAX_DEGREES"]

JAW_MAX_DEGREES = 13.0  # jaw rotation at jaw_open = 1: about 2.3 cm of inner-lip gap
UPPER_LIP_LIFT_CM = 0.12  # upper-lip raise at jaw_open = 1
SPREAD_SCALE = 0.3  # horizontal stretch of the mouth region at spread = 1
PUCKER_SCALE = 0.28  # horizontal squeeze at pucker = 1
PUCKER_FORWARD_CM = 0.6
LID_MEETING_FRACTION = 0.25  # where closed lids meet, from the lower lid towards the upper


def _group_vertices(*names: str) -> set[int]:
    return {v for name, _, edges in DRAW_GROUPS if name in names for edge in edges for v in edge}


@lru_cache(maxsize=1)
def _jaw_weights() -> np.ndarray:
    """(468,) harmonic weights on the template's mesh graph: 1 on lower lip and chin, 0 above the mouth.

    Solves the graph Laplace equation with those values fixed, so the weight falls smoothly across the
    cheeks. The mouth and eye holes are open in the template's triangles, so upper and lower lips touch
    only at the corners, which end up near 0.5.
    """
    template = load_face_template()
    mesh, triangles = template.mesh.astype(np.float64), template.triangles
    count = len(mesh)
    edges = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
    adjacency = scipy.sparse.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(count, count))
    adjacency = ((adjacency + adjacency.T) > 0).astype(np.float64)
    laplacian = scipy.sparse.diags(np.asarray(adjacency.sum(axis=1)).ravel()) - adjacency

    corners = set(MOUTH_CORNERS) | {INNER_LIP_POLYGON[0], INNER_LIP_POLYGON[10]}
    lower_lip = _group_vertices("lips_inner_bottom_left", "lips_inner_bottom_right",
                                "lips_outer_bottom_left", "lips_outer_bottom_right") - corners
    upper_lip = _group_vertices("lips_inner_top_left", "lips_inner_top_right",
                                "lips_outer_top_left", "lips_outer_top_right") - corners
    x, y = mesh[:, 0], mesh[:, 1]
    nose_base = mesh[2, 1]
    chin = (y < y.min() + 2.5) & (np.abs(x) < 3.5)
    fixed = np.zeros(count, dtype=bool)
    value = np.zeros(count)
    for vertices, weight in ((upper_lip, 0.0), (lower_lip, 1.0)):
        fixed[list(vertices)], value[list(vertices)] = True, weight
    fixed |= chin | (y > nose_base)
    value[chin] = 1.0
    free = ~fixed
    system = laplacian.tocsr()
    rhs = -system[free][:, fixed] @ value[fixed]
    value[free] = scipy.sparse.linalg.spsolve(system[free][:, free].tocsc(), rhs)
    return np.clip(value, 0.0, 1.0)


@dataclass(frozen=True)
class FaceRig:
    """Per-identity expression rig, built from the identity's neutral mesh."""

    neutral: np.ndarray  # (468, 3)
    jaw_weight: np.ndarray  # (468,)
    jaw_pivot: np.ndarray  # (3,) a point on the jaw's rotation axis (parallel to x)
    upper_lip_weight: np.ndarray  # (468,)
    mouth_centre: np.ndarray  # (3,)
    mouth_weight: np.ndarray  # (468,) Gaussian around the mouth, for spread / pucker
    upper_lids: tuple[np.ndarray, np.ndarray]  # right, left: upper-lid vertex indices
    lower_lids: tuple[np.ndarray, np.ndarray]  # the lower-lid vertex facing each upper one


def build_rig(neutral: np.ndarray) -> FaceRig:
    jaw_weight = _jaw_weights()
    ear_points = neutral[[234, 454]].mean(axis=0)  # the face's sides, level with the ears
    jaw_pivot = np.array((0.0, ear_points[1] - 1.0, ear_points[2] - 2.5))
    mouth_centre = neutral[list(MOUTH_CORNERS)].mean(axis=0)
    offset = neutral - mouth_centre
    mouth_weight = np.exp(-0.5 * ((offset[:, 0] / 2.4) ** 2 + (offset[:, 1] / 1.6) ** 2 + (offset[:, 2] / 2.5) ** 2))
    upper_lip_centre = neutral[0]
    upper_lip_weight = (1.0 - jaw_weight) * np.exp(-0.5 * np.sum(((neutral - upper_lip_centre) / 1.5) ** 2, axis=1))
    upper_lip_weight[neutral[:, 1] > neutral[2, 1]] = 0.0  # nothing above the nose base moves
    # Lid lists run corner to corner in opposite directions; reverse the lower one to pair vertices.
    return FaceRig(
        neutral=neutral,
        jaw_weight=jaw_weight,
        jaw_pivot=jaw_pivot,
        upper_lip_weight=upper_lip_weight,
        mouth_centre=mouth_centre,
        mouth_weight=mouth_weight,
        upper_lids=(np.array(RIGHT_UPPER_LID), np.array(LEFT_UPPER_LID)),
        lower_lids=(np.array(RIGHT_LOWER_LID[::-1]), np.array(LEFT_LOWER_LID[::-1])),
    )


def jaw_rotation_offsets(rig: FaceRig, jaw_open: np.ndarray, points: np.ndarray | None = None) -> np.ndarray:
    """(T, N, 3) offsets of ``points`` (default: the neutral mesh) rigidly rotated with the jaw."""
    points = rig.neutral if points is None else points
    angle = np.deg2rad(JAW_MAX_DEGREES) * np.asarray(jaw_open, dtype=np.float64)[:, None]  # (T, 1)
    relative = points - rig.jaw_pivot  # (N, 3)
    cos_minus_one, sin = np.cos(angle) - 1.0, np.sin(angle)
    offsets = np.zeros((len(angle), len(points), 3))
    # A positive rotation about +x moves points below the pivot down and back: the jaw opens.
    offsets[..., 1] = relative[:, 1] * cos_minus_one - relative[:, 2] * sin
    offsets[..., 2] = relative[:, 1] * sin + relative[:, 2] * cos_minus_one
    return offsets


def express(
    rig: FaceRig, jaw_open: np.ndarray, spread: np.ndarray, pucker: np.ndarray, blink: np.ndarray
) -> np.ndarray:
    """(T, 468, 3) meshes: neutral + jaw, lip and lid offsets. Controls are (T,); blink is (T, 2) = (left, right)."""
    neutral = rig.neutral
    mesh = neutral + rig.jaw_weight[:, None] * jaw_rotation_offsets(rig, jaw_open)  # (T, 468, 3)
    mesh[..., 1] += UPPER_LIP_LIFT_CM * jaw_open[:, None] * rig.upper_lip_weight

    horizontal = (SPREAD_SCALE * spread - PUCKER_SCALE * pucker)[:, None] * rig.mouth_weight  # (T, 468)
    mesh[..., 0] += horizontal * (neutral[:, 0] - rig.mouth_centre[0])
    squeeze = 0.5 * PUCKER_SCALE * pucker[:, None] * rig.mouth_weight
    mesh[..., 1] -= squeeze * (neutral[:, 1] - rig.mouth_centre[1])
    mesh[..., 2] += PUCKER_FORWARD_CM * pucker[:, None] * rig.mouth_weight

    right_blink, left_blink = blink[:, 1], blink[:, 0]
    for amount, upper, lower in zip((right_blink, left_blink), rig.upper_lids, rig.lower_lids):
        meeting = neutral[lower] + LID_MEETING_FRACTION * (neutral[upper] - neutral[lower])  # (7, 3)
        mesh[:, upper] += amount[:, None, None] * (meeting - neutral[upper])
        mesh[:, lower] += amount[:, None, None] * (meeting - neutral[lower])
    return mesh
