"""Face landmarks with MediaPipe's FaceLandmarker (Tasks API): 478 points, 52 blendshapes, the facial
transformation matrix and the pose-free metric mesh (``mesh3d``) derived as MediaPipe's geometry pipeline
defines it (``aniportrait.face.metric``).

Model file, first match wins: the ``model_path`` argument (config key ``face.landmarker_model``), the
environment variable ``ANIPORTRAIT_FACE_LANDMARKER``, the user cache (``~/.cache/aniportrait``), else a
download from MediaPipe's public model storage into that cache.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aniportrait.errors import AniPortraitError
from aniportrait.face.metric import GeometryMetadata, MetricConverter
from aniportrait.utils.atomic import atomic_path

__all__ = ["FaceLandmarker", "FaceFrame", "resolve_landmarker_model", "LANDMARKER_URL"]

log = logging.getLogger(__name__)

LANDMARKER_URL = (
    "https://storage.googleapis.com/mediapipe-models/face_landmarker/face_landmarker/float16/1/face_landmarker.task"
)
CACHE_DIR = Path(os.environ.get("ANIPORTRAIT_CACHE", Path.home() / ".cache" / "aniportrait"))
_CACHE_NAME = "face_landmarker.task"


def resolve_landmarker_model(model_path: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Find the FaceLandmarker ``.task`` file; download it into the cache if nothing is configured."""
    if model_path:
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise AniPortraitError(
                f"face landmarker model not found: {path} (config key face.landmarker_model); "
                f"point it at a face_landmarker .task file, e.g. one downloaded from {LANDMARKER_URL}"
            )
        return path
    env = os.environ.get("ANIPORTRAIT_FACE_LANDMARKER")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise AniPortraitError(
                f"ANIPORTRAIT_FACE_LANDMARKER names {path}, which does not exist; fix the variable or unset it"
            )
        return path
    cached = CACHE_DIR / _CACHE_NAME
    if cached.is_file():
        return cached
    if download:
        try:
            with atomic_path(cached) as tmp, urllib.request.urlopen(LANDMARKER_URL, timeout=30) as response:
                tmp.write_bytes(response.read())
            log.info("downloaded the face landmarker model to %s", cached)
            return cached
        except OSError as error:
            reason = error
    else:
        reason = "downloads disabled"
    raise AniPortraitError(
        f"no face landmarker model: set config key face.landmarker_model (or ANIPORTRAIT_FACE_LANDMARKER) to a "
        f".task file, or download {LANDMARKER_URL} to {cached} ({reason})"
    )


@dataclass
class FaceFrame:
    """One detected face in one image."""

    lmks: np.ndarray  # (478, 3) float32 normalised x, y in [0, 1]; z relative
    mesh3d: np.ndarray  # (468, 3) float32 pose-free metric mesh
    trans_mat: np.ndarray  # (4, 4) float32 canonical -> camera
    blendshapes: np.ndarray  # (52,) float32
    num_faces: int = 1  # faces MediaPipe found; the largest (or the tracked one) is returned

    def pixel_landmarks(self, image_size: tuple[int, int]) -> np.ndarray:
        """(478, 2) pixel coordinates in an image of (height, width)."""
        height, width = image_size
        return self.lmks[:, :2] * np.array([width, height], dtype=np.float32)

    def bbox(self, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) pixel box of the landmarks."""
        xy = self.pixel_landmarks(image_size)
        return float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()), float(xy[:, 1].max())


class FaceLandmarker:
    """MediaPipe FaceLandmarker in IMAGE or VIDEO mode.

    ``max_faces`` > 1 lets us see every face: the largest is returned (or, in VIDEO mode, the one nearest
    the previous frame's face), and ``FaceFrame.num_faces`` says how many there were.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        mode: str = "image",
        max_faces: int = 2,
        min_detection_confidence: float = 0.5,
        min_presence_confidence: float = 0.5,
        min_tracking_confidence: float = 0.5,
    ):
        from mediapipe.tasks.python import BaseOptions, vision

        if mode not in ("image", "video"):
            raise AniPortraitError(f"FaceLandmarker mode must be 'image' or 'video', got {mode!r}")
        self.model_path = resolve_landmarker_model(model_path)
        self.mode = mode
        running_mode = vision.RunningMode.IMAGE if mode == "image" else vision.RunningMode.VIDEO
        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(self.model_path)),
            running_mode=running_mode,
            num_faces=max_faces,
            min_face_detection_confidence=min_detection_confidence,
            min_face_presence_confidence=min_presence_confidence,
            min_tracking_confidence=min_tracking_confidence,
            output_face_blendshapes=True,
            output_facial_transformation_matrixes=True,
        )
        self._landmarker = vision.FaceLandmarker.create_from_options(options)
        self._converter = MetricConverter(GeometryMetadata.from_task_file(self.model_path))
        self._previous_centre: np.ndarray | None = None
        self._last_timestamp = -1

    def __enter__(self) -> FaceLandmarker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._landmarker is not None:
            self._landmarker.close()
            self._landmarker = None

    def detect(self, image_rgb: np.ndarray, timestamp_ms: int | None = None) -> FaceFrame | None:
        """Landmarks of the main face in an RGB uint8 (H, W, 3) image, or None when there is no face."""
        import mediapipe as mp

        image_rgb = np.ascontiguousarray(image_rgb)
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
            raise AniPortraitError(f"expected an RGB uint8 image of shape (H, W, 3), got {image_rgb.shape} {image_rgb.dtype}")
        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=image_rgb)
        if self.mode == "video":
            if timestamp_ms is None:
                raise AniPortraitError("VIDEO-mode landmark detection needs a timestamp_ms per frame")
            timestamp_ms = max(int(timestamp_ms), self._last_timestamp + 1)  # MediaPipe needs increasing stamps
            self._last_timestamp = timestamp_ms
            result = self._landmarker.detect_for_video(image, timestamp_ms)
        else:
            result = self._landmarker.detect(image)
        if not result.face_landmarks:
            self._previous_centre = None
            return None
        height, width = image_rgb.shape[:2]
        faces = [np.array([(p.x, p.y, p.z) for p in face], dtype=np.float32) for face in result.face_landmarks]
        index = self._choose_face(faces, (height, width))
        lmks = faces[index]
        trans_mat = np.asarray(result.facial_transformation_matrixes[index], dtype=np.float64).reshape(4, 4)
        blendshapes = np.array([c.score for c in result.face_blendshapes[index]], dtype=np.float32)
        mesh3d = self._converter.canonical_mesh(lmks, trans_mat, (height, width))
        return FaceFrame(
            lmks=lmks,
            mesh3d=mesh3d.astype(np.float32),
            trans_mat=trans_mat.astype(np.float32),
            blendshapes=blendshapes,
            num_faces=len(faces),
        )

    def _choose_face(self, faces: list[np.ndarray], image_size: tuple[int, int]) -> int:
        height, width = image_size
        scale = np.array([width, height], dtype=np.float32)
        centres = [face[:, :2].mean(axis=0) * scale for face in faces]
        if self.mode == "video" and self._previous_centre is not None and len(faces) > 1:
            index = int(np.argmin([np.linalg.norm(c - self._previous_centre) for c in centres]))
        else:
            areas = [np.prod(np.ptp(face[:, :2] * scale, axis=0)) for face in faces]
            index = int(np.argmax(areas))
        self._previous_centre = centres[index]
        return index
