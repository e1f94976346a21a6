"""The project's neutral face template: a 468-vertex metric mesh and its render triangles.

``assets/face_template.npz`` was made by ``python -m aniportrait.data.face_template_build build`` from the media in
``shared/samples`` (4 talking-head clips and 3 portraits): MediaPipe's FaceLandmarker gave landmarks and
transformation matrices, ``aniportrait.face.metric`` turned them into pose-free metric meshes, frames with
the mouth closed and eyes open (blendshapes jawOpen < 0.05, eyeBlink < 0.35) were kept, each source's
median mesh was taken, and the sources were averaged. The triangles are MediaPipe's canonical-mesh
triangles (from the landmarker bundle's geometry metadata) minus the ones that close the mouth and the
eyes, so those stay open when the face is rendered. About 10 KB; the synthetic dataset builds its
identities from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from aniportrait.face.topology import INNER_LIP_POLYGON, LEFT_EYE_POLYGON, RIGHT_EYE_POLYGON

__all__ = ["FaceTemplate", "load_face_template", "open_triangles"]

TEMPLATE_PATH = Path(__file__).parent / "assets" / "face_template.npz"


@dataclass(frozen=True)
class FaceTemplate:
    mesh: np.ndarray  # (468, 3) float32, centimetres, canonical pose-free space
    triangles: np.ndarray  # (F, 3) int64, counter-clockwise seen from the front


@lru_cache(maxsize=1)
def load_face_template(path: str | None = None) -> FaceTemplate:
    with np.load(Path(path) if path else TEMPLATE_PATH) as data:
        return FaceTemplate(mesh=data["mesh"].astype(np.float32), triangles=data["triangles"].astype(np.int64))


def open_triangles(triangles: np.ndarray) -> np.ndarray:
    """Drop triangles whose three vertices all lie on the inner-lip or an eye contour (hole fillers)."""
    keep = np.ones(len(triangles), dtype=bool)
    for ring in (INNER_LIP_POLYGON, LEFT_EYE_POLYGON, RIGHT_EYE_POLYGON):
        keep &= ~np.isin(triangles, ring).all(axis=1)
    return triangles[keep]
