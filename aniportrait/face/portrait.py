"""A portrait ready for animation: a square RGB image of the face with its landmarks, mesh and camera.

Framing rule (any input size or aspect ratio): find the largest face in the whole (upright) image, then
take the square of side ``min(short image side, crop_scale * face extent)`` centred on the face and
shifted to lie inside the image, and resize it to ``size`` x ``size``. Portraits that already frame a
head (face extent at least ``1 / crop_scale`` of the short side) therefore keep their full short side
and only lose the excess of the long side; a small face in a large image (full body, group photo) gets
a head-and-shoulders crop. The square never leaves the image, so nothing is padded. Faces too small for
the detector in the whole image are searched for in tiles. The landmarks are
then detected again on the final image, so every field describes exactly the returned pixels.

Input handling: EXIF orientation is applied, an alpha channel is dropped (the stored colour is kept, as
``cv2.imread`` does), grayscale and 16-bit images become 8-bit RGB. Several faces: the largest wins and a
warning is logged. No face: ``AniPortraitError("no face found in <path>")``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from aniportrait.errors import AniPortraitError
from aniportrait.face.landmarks import FaceLandmarker, find_face_in_tiles

__all__ = ["Portrait", "load_portrait", "read_image_rgb", "resize_square", "square_face_crop"]

log = logging.getLogger(__name__)

# Faces MediaPipe is asked for, so that "several faces" can be seen and the largest chosen.
_MAX_FACES = 5
# Images are searched for faces at most this large (long side, pixels); MediaPipe resizes to 128-256 anyway.
_DETECTION_MAX_SIDE = 2048


@dataclass
class Portrait:
    """The reference image of an animation and its face, in that image's coordinates."""

    image: np.ndarray  # (size, size, 3) uint8 RGB
    lmks: np.ndarray  # (478, 3) float32, normalised x, y in [0, 1] of ``image``; z relative
    mesh3d: np.ndarray  # (468, 3) float32, canonical pose-free metric mesh
    trans_mat: np.ndarray  # (4, 4) float32, canonical -> camera
    blendshapes: np.ndarray  # (52,) float32
    source: str = "<array>"  # where the portrait came from (a path, or "<array>")
    crop_box: tuple[int, int, int, int] = (0, 0, 0, 0)  # (x0, y0, x1, y1) of the square in the upright source

    @property
    def size(self) -> int:
        return int(self.image.shape[0])

    def pixel_landmarks(self) -> np.ndarray:
        """(478, 2) pixel (x, y) in ``image``."""
        return self.lmks[:, :2] * np.array([self.image.shape[1], self.image.shape[0]], dtype=np.float32)


def read_image_rgb(path_or_array: str | os.PathLike | np.ndarray) -> np.ndarray:
    """Any image file or array -> upright 8-bit RGB (H, W, 3).

    Arrays are taken as RGB or RGBA, (H, W) or (H, W, 1) grayscale; float arrays in [0, 1].
    """
    if isinstance(path_or_array, np.ndarray):
        image = path_or_array
        if np.issubdtype(image.dtype, np.floating):
            image = np.clip(np.nan_to_num(image) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        elif image.dtype == np.uint16:
            image = (image >> 8).astype(np.uint8)
        elif image.dtype != np.uint8:
            raise AniPortraitError(f"portrait array has dtype {image.dtype}; give uint8, uint16 or float in [0, 1]")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise AniPortraitError(f"portrait array has shape {image.shape}; give (H, W), (H, W, 3) RGB or (H, W, 4) RGBA")
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        return np.ascontiguousarray(image[:, :, :3])
    path = Path(path_or_array)
    if not path.is_file():
        raise AniPortraitError(f"portrait image not found: {path}; check the path")
    if path.stat().st_size == 0:
        raise AniPortraitError(f"portrait image {path} is empty (0 bytes); give a PNG, JPEG, WebP, BMP or TIFF file")
    # IMREAD_COLOR applies the EXIF orientation, drops alpha and converts gray and 16-bit to 8-bit BGR.
    try:
        image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        image = None
    if image is None:
        raise AniPortraitError(f"cannot read image {path}; give a PNG, JPEG, WebP, BMP or TIFF file")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def square_face_crop(image_size: tuple[int, int], face_box: tuple[float, float, float, float],
                     crop_scale: float) -> tuple[int, int, int, int]:
    """The module's framing rule: (x0, y0, x1, y1) of a square inside an image of (height, width)."""
    height, width = image_size
    x0, y0, x1, y1 = face_box
    extent = max(x1 - x0, y1 - y0)
    side = int(round(min(min(height, width), crop_scale * extent)))
    left = int(round((x0 + x1) / 2 - side / 2))
    top = int(round((y0 + y1) / 2 - side / 2))
    left = min(max(left, 0), width - side)
    top = min(max(top, 0), height - side)
    return left, top, left + side, top + side


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """A square image at ``size`` x ``size`` (area averaging down, cubic up)."""
    interpolation = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interpolation)


def _largest_face_box(landmarker: FaceLandmarker, image: np.ndarray, name: str) -> tuple[float, float, float, float]:
    """The largest face's landmark box; small faces are searched for in tiles."""
    face = landmarker.detect(image)
    if face is None:
        box = find_face_in_tiles(landmarker, image)
        if box is None:
            raise AniPortraitError(f"no face found in {name}; give a photo in which one face is clearly visible")
        return box
    if face.num_faces > 1:
        log.warning("%s shows %d faces; the largest is used", name, face.num_faces)
    return face.bbox(image.shape[:2])


def load_portrait(
    path_or_array: str | os.PathLike | np.ndarray,
    size: int = 512,
    landmarker_model: str | os.PathLike | None = None,
    crop_scale: float = 2.5,
) -> Portrait:
    """Load, frame (see the module docstring) and landmark a portrait.

    ``crop_scale``: side of the square over the face extent (landmark box) for images with small faces.
    """
    name = "<array>" if isinstance(path_or_array, np.ndarray) else str(path_or_array)
    image = read_image_rgb(path_or_array)
    height, width = image.shape[:2]
    with FaceLandmarker(landmarker_model, mode="image", max_faces=_MAX_FACES) as landmarker:
        scale = min(1.0, _DETECTION_MAX_SIDE / max(height, width))
        search = image if scale == 1.0 else cv2.resize(image, (round(width * scale), round(height * scale)),
                                                          interpolation=cv2.INTER_AREA)
        box = tuple(value / scale for value in _largest_face_box(landmarker, search, name))
        crop_box = square_face_crop((height, width), box, crop_scale)
        x0, y0, x1, y1 = crop_box
        framed = resize_square(image[y0:y1, x0:x1], size)
        final = landmarker.detect(framed)
    if final is None:
        raise AniPortraitError(
            f"no face found in {name} after framing it to {size}x{size} (the face is too small or cut off); "
            f"give a larger image of the face or a larger size"
        )
    return Portrait(framed, final.lmks, final.mesh3d, final.trans_mat, final.blendshapes, name, crop_box)
