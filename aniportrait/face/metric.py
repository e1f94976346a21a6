"""MediaPipe's face-geometry pipeline, recomputed from the landmarker's public outputs.

MediaPipe's FaceLandmarker returns normalised screen landmarks and the facial transformation matrix,
but not the pose-free metric mesh that AniPortrait calls ``lmks3d`` (the official code patches
MediaPipe to get it). This module derives it the way MediaPipe's ``geometry_pipeline.cc`` does:

1. screen landmarks -> near-plane coordinates of the perspective camera frustum (``ProjectXY``);
2. two rounds of weighted Procrustes against the canonical face to estimate the metric scale;
3. rescale depth, unproject x and y, flip handedness: metric camera-space landmarks;
4. a final weighted Procrustes fit gives the pose matrix; its inverse maps the landmarks into the
   canonical, pose-free space: ``mesh3d``.

The canonical mesh, the Procrustes weights and the triangle list come from the geometry metadata
stored inside the landmarker ``.task`` bundle (``geometry_pipeline_metadata_landmarks.binarypb``).
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aniportrait.face.geometry import DEFAULT_CAMERA, PerspectiveCamera
from aniportrait.face.topology import NUM_MESH_VERTICES

__all__ = ["GeometryMetadata", "MetricConverter", "solve_weighted_procrustes"]

_METADATA_MEMBER = "geometry_pipeline_metadata_landmarks.binarypb"


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes):
    """Yield (field_number, wire_type, value) of one protobuf message (value: int or bytes)."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _packed_varints(data: bytes) -> list[int]:
    out, pos = [], 0
    while pos < len(data):
        value, pos = _read_varint(data, pos)
        out.append(value)
    return out


@dataclass(frozen=True)
class GeometryMetadata:
    """Canonical face (468 x 3, cm), its UVs, triangles and the Procrustes landmark weights."""

    canonical_vertices: np.ndarray  # (468, 3) float64
    uv: np.ndarray  # (468, 2)
    triangles: np.ndarray  # (F, 3) int
    landmark_weights: np.ndarray  # (468,) float64

    @classmethod
    def from_bytes(cls, data: bytes) -> GeometryMetadata:
        # GeometryPipelineMetadata: 1 canonical_mesh (Mesh3d), 2 procrustes_landmark_basis (repeated
        # WeightedLandmarkRef{1 landmark_id, 2 weight}), 3 input_source.
        # Mesh3d: 1 vertex_type, 2 primitive_type, 3 vertex_buffer (packed float), 4 index_buffer (packed uint32).
        vertex_floats: list[float] = []
        indices: list[int] = []
        weights = np.zeros(NUM_MESH_VERTICES)
        for number, wire, value in _fields(data):
            if number == 1 and wire == 2:
                for mesh_number, mesh_wire, mesh_value in _fields(value):
                    if mesh_number == 3 and mesh_wire == 2:
                        vertex_floats.extend(struct.unpack(f"<{len(mesh_value) // 4}f", mesh_value))
                    elif mesh_number == 3 and mesh_wire == 5:
                        vertex_floats.append(struct.unpack("<f", mesh_value)[0])
                    elif mesh_number == 4 and mesh_wire == 2:
                        indices.extend(_packed_varints(mesh_value))
                    elif mesh_number == 4 and mesh_wire == 0:
                        indices.append(mesh_value)
            elif number == 2 and wire == 2:
                landmark_id, weight = 0, 0.0
                for ref_number, ref_wire, ref_value in _fields(value):
                    if ref_number == 1 and ref_wire == 0:
                        landmark_id = ref_value
                    elif ref_number == 2 and ref_wire == 5:
                        weight = struct.unpack("<f", ref_value)[0]
                weights[landmark_id] = weight
        vertex_buffer = np.asarray(vertex_floats, dtype=np.float64).reshape(-1, 5)  # VERTEX_PT: x y z u v
        if vertex_buffer.shape[0] != NUM_MESH_VERTICES:
            raise ValueError(f"geometry metadata has {vertex_buffer.shape[0]} vertices, expected {NUM_MESH_VERTICES}")
        return cls(
            canonical_vertices=vertex_buffer[:, :3].copy(),
            uv=vertex_buffer[:, 3:].copy(),
            triangles=np.asarray(indices, dtype=np.int64).reshape(-1, 3),
            landmark_weights=weights,
        )

    @classmethod
    def from_task_file(cls, task_path: str | Path) -> GeometryMetadata:
        """Read the metadata from a FaceLandmarker ``.task`` bundle (a zip archive)."""
        with zipfile.ZipFile(task_path) as archive:
            return cls.from_bytes(archive.read(_METADATA_MEMBER))


def solve_weighted_procrustes(source: np.ndarray, target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """4x4 similarity ``T`` minimising sum_i w_i |T(source_i) - target_i|^2 (no reflections).

    source, target: (N, 3). Follows MediaPipe's ``ProcrustesSolver`` (SVD rotation, then scale, then
    the weighted translation).
    """
    sqrt_w = np.sqrt(weights)[None, :]  # (1, N)
    src = source.T * sqrt_w  # (3, N) weighted sources
    tgt = target.T * sqrt_w
    total_weight = float((sqrt_w * sqrt_w).sum())
    source_centre = (src * sqrt_w).sum(axis=1, keepdims=True) / total_weight
    centred_src = src - source_centre * sqrt_w
    design = tgt @ centred_src.T
    u, _, vt = np.linalg.svd(design)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        u[:, 2] *= -1
    rotation = u @ vt
    scale = float(((rotation @ centred_src) * tgt).sum() / (centred_src * src).sum())
    rotation_and_scale = scale * rotation
    translation = ((tgt - rotation_and_scale @ src) * sqrt_w).sum(axis=1) / total_weight
    transform = np.eye(4)
    transform[:3, :3] = rotation_and_scale
    transform[:3, 3] = translation
    return transform


class MetricConverter:
    """Screen landmarks -> metric camera-space landmarks, pose matrix and the pose-free mesh."""

    def __init__(self, metadata: GeometryMetadata, camera: PerspectiveCamera = DEFAULT_CAMERA):
        self.metadata = metadata
        self.camera = camera

    def _estimate_scale(self, landmarks: np.ndarray) -> float:
        transform = solve_weighted_procrustes(
            self.metadata.canonical_vertices, landmarks, self.metadata.landmark_weights
        )
        return float(np.linalg.norm(transform[:3, 0]))

    def convert(self, landmarks: np.ndarray, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One face: normalised landmarks (>=468, 3), image (height, width).

        Returns (metric camera-space landmarks (468, 3), pose transform (4, 4), pose-free mesh (468, 3)).
        """
        height, width = image_size
        left, right, bottom, top = self.camera.frustum(width / height)
        near = self.camera.near
        screen = np.asarray(landmarks, dtype=np.float64)[:NUM_MESH_VERTICES, :3].copy()
        # ProjectXY: normalised image coordinates -> near-plane coordinates (z scaled like x).
        screen[:, 1] = 1.0 - screen[:, 1]
        screen *= np.array([right - left, top - bottom, right - left])
        screen += np.array([left, bottom, 0.0])
        depth_offset = screen[:, 2].mean()

        def unproject(scale: float) -> np.ndarray:
            points = screen.copy()
            points[:, 2] = (points[:, 2] - depth_offset + near) / scale
            points[:, 0] = points[:, 0] * points[:, 2] / near
            points[:, 1] = points[:, 1] * points[:, 2] / near
            points[:, 2] *= -1.0
            return points

        flipped = screen.copy()
        flipped[:, 2] *= -1.0
        first_scale = self._estimate_scale(flipped)
        second_scale = self._estimate_scale(unproject(first_scale))
        metric = unproject(first_scale * second_scale)
        pose = solve_weighted_procrustes(self.metadata.canonical_vertices, metric, self.metadata.landmark_weights)
        inverse = np.linalg.inv(pose)
        mesh = metric @ inverse[:3, :3].T + inverse[:3, 3]
        return metric, pose, mesh

    def canonical_mesh(self, landmarks: np.ndarray, trans_mat: np.ndarray | None, image_size: tuple[int, int]) -> np.ndarray:
        """The pose-free mesh of one face; with ``trans_mat`` given, MediaPipe's own matrix is inverted.

        MediaPipe's reported matrix equals our Procrustes fit up to float32 rounding; using it keeps
        ``mesh3d`` and ``trans_mat`` of a clip exactly consistent.
        """
        metric, pose, mesh = self.convert(landmarks, image_size)
        if trans_mat is None:
            return mesh
        inverse = np.linalg.inv(np.asarray(trans_mat, dtype=np.float64))
        return metric @ inverse[:3, :3].T + inverse[:3, 3]
