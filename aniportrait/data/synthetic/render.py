"""Flat-shaded rendering of a synthetic face with OpenCV: fast enough for 100+ frames/s on one core.

Back to front: a vertical-gradient background with the shoulders; the hair, the neck (head-attached 3-D
point sets whose projected convex hulls are filled); the mouth interior (dark, upper and lower teeth)
and the eyes (sclera, iris, pupil, highlight), both visible only through the holes of the face mesh;
then the face's triangles, back faces culled, sorted by depth (painter's algorithm), each filled with
one Lambert-shaded colour (skin, lips or brows); last the upper-lid lash lines. Polygons are filled with
4 bits of sub-pixel precision on a canvas twice the frame size, then area-averaged down (anti-aliasing).
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from aniportrait.data.synthetic.expression import FaceRig, jaw_rotation_offsets
from aniportrait.data.synthetic.identity import Identity
from aniportrait.face.geometry import project_points
from aniportrait.face.template import load_face_template
from aniportrait.face.topology import (
    INNER_LIP_POLYGON,
    LEFT_EYE_POLYGON,
    LEFT_UPPER_LID,
    RIGHT_EYE_POLYGON,
    RIGHT_UPPER_LID,
)

__all__ = ["FaceRenderer"]

# Outer lip contour in polygon order (corner 61 -> lower lip -> corner 291 -> upper lip).
OUTER_LIP_POLYGON = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
# Upper and lower rows of each eyebrow (MediaPipe's brow vertices).
BROW_VERTICES = frozenset((70, 63, 105, 66, 107, 46, 53, 52, 65, 55, 300, 293, 334, 296, 336, 276, 283, 282, 295, 285))

LIGHT_DIRECTION = np.array((-0.35, 0.45, 0.82)) / np.linalg.norm((-0.35, 0.45, 0.82))  # camera space
AMBIENT, DIFFUSE = 0.42, 0.62
SHIFT = 4  # sub-pixel bits of OpenCV's polygon fills
SUBPIXEL = 1 << SHIFT
SCLERA = (232.0, 226.0, 218.0)
PUPIL = (14.0, 12.0, 12.0)
MOUTH_INTERIOR = (72.0, 24.0, 30.0)
TEETH = (208.0, 201.0, 186.0)
LASHES = (28.0, 20.0, 20.0)
SKIN, LIPS, BROWS = 0, 1, 2  # triangle materials
MOUTH_OPENING = np.array(INNER_LIP_POLYGON)
EYE_OPENINGS = (np.array(RIGHT_EYE_POLYGON), np.array(LEFT_EYE_POLYGON))
LASH_LINES = (np.array((133, *RIGHT_UPPER_LID, 33)), np.array((362, *LEFT_UPPER_LID, 263)))  # corner to corner


@lru_cache(maxsize=1)
def _triangle_materials() -> np.ndarray:
    """(F,) material of each template triangle: lips inside the outer-lip contour, brows, else skin."""
    template = load_face_template()
    centroids = template.mesh[template.triangles].mean(axis=1)[:, :2].astype(np.float32)  # (F, 2)
    outer_lips = template.mesh[list(OUTER_LIP_POLYGON), :2].astype(np.float32)
    inside = np.array([cv2.pointPolygonTest(outer_lips, (float(x), float(y)), False) > 0 for x, y in centroids])
    brows = np.isin(template.triangles, list(BROW_VERTICES)).all(axis=1)
    return np.where(inside, LIPS, np.where(brows, BROWS, SKIN))


def _fixed_point(pixels: np.ndarray) -> np.ndarray:
    """Pixel coordinates (origin at the top-left corner of the image) -> OpenCV's shifted integer
    coordinates (origin at the centre of the top-left pixel)."""
    return np.round((pixels - 0.5) * SUBPIXEL).astype(np.int32, order="C")  # cv2 needs C order


def _ellipsoid_directions(rows: int, columns: int) -> np.ndarray:
    """(rows * columns, 3) unit vectors on a latitude-longitude grid."""
    polar = np.linspace(0.0, np.pi, rows)[:, None]
    azimuth = np.linspace(0.0, 2.0 * np.pi, columns, endpoint=False)[None, :]
    directions = np.stack(np.broadcast_arrays(np.sin(polar) * np.sin(azimuth), np.cos(polar),
                                              np.sin(polar) * np.cos(azimuth)), axis=-1)
    return directions.reshape(-1, 3)


class FaceRenderer:
    """Renders one identity's clips at ``size`` x ``size``; hair, neck and teeth are fixed to the head.

    Frames are drawn at ``supersample`` times the size and shrunk by pixel-area averaging, which
    anti-aliases the edges between triangles of different shades without seams.
    """

    def __init__(self, identity: Identity, rig: FaceRig, size: int, supersample: int = 2):
        self.identity, self.rig, self.size = identity, rig, size
        self.canvas_size = size * supersample
        self.triangles = load_face_template().triangles  # (F, 3)
        neutral = identity.neutral_mesh
        materials = _triangle_materials()
        self.base_colours = np.stack([identity.skin, identity.lips, identity.brows])[materials]  # (F, 3)
        self.background = self._background()
        self.hair_points = self._hair_points(neutral)
        self.neck_points = self._neck_points(neutral)
        # Upper teeth hang from the skull just behind the upper lip; lower teeth ride on the jaw.
        upper_lip = neutral[list(INNER_LIP_POLYGON[11:])]  # 415 .. 191, right to left in the image
        lower_lip = neutral[list(INNER_LIP_POLYGON[1:10])]  # 95 .. 324, left to right
        narrow = np.array((0.85, 1.0, 1.0))
        upper_edge = (upper_lip - (0.0, 0.1, 0.4)) * narrow
        lower_edge = (lower_lip - (0.0, -0.05, 0.45)) * narrow
        self.upper_teeth = np.concatenate([upper_edge, upper_edge[::-1] - (0.0, 0.55, 0.0)])
        self.lower_teeth = np.concatenate([lower_edge, lower_edge[::-1] + (0.0, 0.35, 0.0)])

    def _background(self) -> np.ndarray:
        """(H, W, 3) vertical gradient with the shoulders, which stay put while the head moves."""
        size, identity = self.canvas_size, self.identity
        ramp = np.linspace(0.0, 1.0, size)[:, None, None]
        row_colours = (1.0 - ramp) * identity.background_top + ramp * identity.background_bottom
        image = np.ascontiguousarray(np.broadcast_to(row_colours, (size, size, 3)).round().astype(np.uint8))
        centre = (size * SUBPIXEL // 2, int(size * 1.08 * SUBPIXEL))
        axes = (int(size * 0.56 * SUBPIXEL), int(size * 0.24 * SUBPIXEL))
        cv2.ellipse(image, centre, axes, 0, 0, 360, identity.clothing.tolist(), -1, cv2.LINE_AA, SHIFT)
        return image

    def _hair_points(self, neutral: np.ndarray) -> np.ndarray:
        """(K, 3) canonical points whose projected hull is the hair: the skull's upper half (not in front
        of the forehead below the hairline) and, at the back and sides, a curtain down to the hair's length."""
        identity = self.identity
        ears = neutral[[234, 454]]
        centre = np.array((0.0, 0.5 * (neutral[10, 1] + ears[:, 1].mean()), ears[:, 2].mean() - 1.0))
        radii = np.array((np.abs(ears[:, 0]).mean() + 0.3, 7.0, 9.0)) + identity.hair_volume_cm
        directions = _ellipsoid_directions(11, 24)  # an odd row count puts a row on the equator
        crown = directions[(directions[:, 1] >= 0.0) & ((directions[:, 2] < 0.2) | (directions[:, 1] > 0.45))]
        equator = directions[(np.abs(directions[:, 1]) < 1e-9) & (directions[:, 2] < 0.3)]
        curtain = centre + radii * equator
        curtain[:, 1] = ears[:, 1].mean() - identity.hair_length_cm
        return np.concatenate([centre + radii * crown, curtain])

    @staticmethod
    def _neck_points(neutral: np.ndarray) -> np.ndarray:
        """(32, 3) two rings of a neck cylinder, from behind the jaw down past the bottom of the frame."""
        chin_y = neutral[:, 1].min()
        half_width = 0.6 * np.abs(neutral[[234, 454], 0]).mean()
        angles = np.linspace(0.0, 2.0 * np.pi, 16, endpoint=False)
        ring = np.stack([half_width * np.sin(angles), np.zeros(16), 4.5 * np.cos(angles) - 4.0], axis=1)
        return np.concatenate([ring + (0.0, chin_y + 4.0, 0.0), ring + (0.0, chin_y - 16.0, 0.0)])

    def _project(self, points: np.ndarray, trans_mat: np.ndarray) -> np.ndarray:
        """(T, N, 3) or (N, 3) canonical points -> (T, N, 2) fixed-point pixels."""
        frames = len(trans_mat)
        points = np.broadcast_to(points, (frames, *points.shape[-2:]))
        return _fixed_point(project_points(points, trans_mat, image_size=(self.canvas_size, self.canvas_size)))

    def render(self, mesh3d: np.ndarray, trans_mat: np.ndarray, jaw_open: np.ndarray) -> np.ndarray:
        """(T, H, W, 3) uint8 RGB frames of meshes (T, 468, 3) seen through ``trans_mat`` (T, 4, 4)."""
        mesh3d, trans_mat = np.asarray(mesh3d, np.float64), np.asarray(trans_mat, np.float64)
        size, identity = self.canvas_size, self.identity
        pixels = project_points(mesh3d, trans_mat, image_size=(size, size))  # (T, 468, 2)
        camera = mesh3d @ np.swapaxes(trans_mat[:, :3, :3], 1, 2) + trans_mat[:, None, :3, 3]  # (T, 468, 3)

        corners = camera[:, self.triangles]  # (T, F, 3, 3)
        normals = np.cross(corners[:, :, 1] - corners[:, :, 0], corners[:, :, 2] - corners[:, :, 0])
        normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
        shade = AMBIENT + DIFFUSE * np.clip(normals @ LIGHT_DIRECTION, 0.0, None)  # (T, F)
        colours = np.clip(shade[..., None] * self.base_colours, 0.0, 255.0)  # (T, F, 3)
        screen = pixels[:, self.triangles]  # (T, F, 3, 2)
        edge_a, edge_b = screen[:, :, 1] - screen[:, :, 0], screen[:, :, 2] - screen[:, :, 0]
        front_facing = edge_a[..., 0] * edge_b[..., 1] - edge_a[..., 1] * edge_b[..., 0] < 0.0  # y points down
        depth_order = np.argsort(corners[..., 2].mean(axis=-1), axis=1)  # far (most negative z) first
        triangle_points = _fixed_point(screen)

        mesh_points = _fixed_point(pixels)
        hair = self._project(self.hair_points, trans_mat)
        neck = self._project(self.neck_points, trans_mat)
        upper_teeth = self._project(self.upper_teeth, trans_mat)
        lower_teeth_3d = self.lower_teeth + jaw_rotation_offsets(self.rig, jaw_open, self.lower_teeth)
        lower_teeth = self._project(lower_teeth_3d, trans_mat)
        irises = project_points(np.broadcast_to(identity.iris_points, (len(mesh3d), 10, 3)), trans_mat,
                                image_size=(size, size))  # (T, 10, 2)

        hair_colour, neck_colour = identity.hair.tolist(), (0.7 * identity.skin).tolist()
        iris_colour, lash_width = identity.iris.tolist(), max(1, round(size / 160))
        frames = np.empty((len(mesh3d), self.size, self.size, 3), dtype=np.uint8)
        image = np.empty_like(self.background)
        for t in range(len(frames)):
            image[:] = self.background
            cv2.fillConvexPoly(image, cv2.convexHull(hair[t]), hair_colour, cv2.LINE_AA, SHIFT)
            cv2.fillConvexPoly(image, cv2.convexHull(neck[t]), neck_colour, cv2.LINE_AA, SHIFT)
            cv2.fillPoly(image, [mesh_points[t, MOUTH_OPENING]], MOUTH_INTERIOR, cv2.LINE_8, SHIFT)
            cv2.fillPoly(image, [upper_teeth[t], lower_teeth[t]], TEETH, cv2.LINE_8, SHIFT)
            for opening, iris in zip(EYE_OPENINGS, (irises[t, :5], irises[t, 5:])):
                cv2.fillPoly(image, [mesh_points[t, opening]], SCLERA, cv2.LINE_8, SHIFT)
                self._draw_iris(image, iris, iris_colour)
            frame_colours = colours[t].tolist()
            frame_triangles = triangle_points[t]
            for index in depth_order[t][front_facing[t][depth_order[t]]]:
                cv2.fillConvexPoly(image, frame_triangles[index], frame_colours[index], cv2.LINE_8, SHIFT)
            lashes = [mesh_points[t, line] for line in LASH_LINES]
            cv2.polylines(image, lashes, False, LASHES, lash_width, cv2.LINE_AA, SHIFT)
            cv2.resize(image, (self.size, self.size), dst=frames[t], interpolation=cv2.INTER_AREA)
        return frames

    @staticmethod
    def _draw_iris(image: np.ndarray, iris: np.ndarray, colour: list[float]) -> None:
        """Iris, pupil and a highlight as ellipses from the projected centre and ring points (5, 2)."""
        centre, ring = iris[0], iris[1:]
        horizontal, vertical = ring[0] - ring[2], ring[1] - ring[3]
        angle = float(np.degrees(np.arctan2(horizontal[1], horizontal[0])))
        axes = np.array((np.linalg.norm(horizontal), np.linalg.norm(vertical))) * 0.5
        for scale, offset, fill in ((1.0, 0.0, colour), (0.42, 0.0, PUPIL), (0.16, 0.3, SCLERA)):
            point = _fixed_point(centre + offset * (vertical - horizontal) * 0.5)
            size = np.round(axes * scale * SUBPIXEL).astype(int)
            cv2.ellipse(image, (int(point[0]), int(point[1])), (int(size[0]), int(size[1])), angle, 0, 360,
                        fill, -1, cv2.LINE_AA, SHIFT)
