"""Face landmarks with MediaPipe's FaceLandmarker (Tasks API): 478 points, 52 blendshapes, the facial
transformation matrix and the pose-free metric mesh (``mesh3d``) derived as MediaPipe's geometry pipeline
defines it (``aniportrait.face.metric``).

Model file, first match wins: the ``model_path`` argument (config key ``face.landmarker_model``), the
environment variable ``ANIPORTRAIT_FACE_LANDMARKER``, the user cache (``~/.cache/aniportrait``), else a
download from MediaPipe's public model storage into that cache.

Videos: :class:`LandmarkSequence` collects VIDEO-mode results frame by frame (so long videos stream in
chunks) and returns the clip-format arrays; :func:`detect_video` and :func:`detect_video_file` wrap it.
They look for one face by default, as the official code does: asked for more faces than it tracks,
MediaPipe re-runs its face detector on every frame, which moves the landmarks by about 2 px at 512x512
(with one face the output is bit-identical to the shared reference landmarks).
Frames without a face have ``valid = False`` and are never NaN: by default their values are linearly
interpolated between the nearest valid frames (held constant before the first and after the last one),
or zero with ``fill="zero"``. Consumers that need measured data only must mask with ``valid``.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aniportrait.errors import AniPortraitError
from aniportrait.face.metric import GeometryMetadata, MetricConverter
from aniportrait.utils.atomic import atomic_path

__all__ = [
    "FaceLandmarker",
    "FaceFrame",
    "LandmarkSequence",
    "detect_video",
    "detect_video_file",
    "fill_invalid_frames",
    "find_face_in_tiles",
    "resolve_landmarker_model",
    "LANDMARKER_URL",
]

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


def _ignore_stray_profiler_signals() -> None:
    """mediapipe 1.2.x links Google's CPU profiler, whose per-thread SIGPROF timers can fire after its handler is
    gone; SIGPROF's default action then ends the process ("Profiling timer expired", exit 155), seen minutes after
    the landmarker ran in long processes (the test suite). Nothing of ours uses SIGPROF: ignore it unless a profiler
    of the user's already handles it (only the main thread may set handlers)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGPROF) == signal.SIG_DFL:
        signal.signal(signal.SIGPROF, signal.SIG_IGN)


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

        _ignore_stray_profiler_signals()
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


def find_face_in_tiles(landmarker: FaceLandmarker, image_rgb: np.ndarray) -> tuple[float, float, float, float] | None:
    """(x0, y0, x1, y1) pixel box of the largest face found in overlapping tiles of half the short side.

    MediaPipe's short-range face detector misses faces smaller than about a tenth of the image (a full
    body shot, a group photo); in a tile they are twice as large. Use an IMAGE-mode landmarker.
    """
    height, width = image_rgb.shape[:2]
    tile = max(64, min(height, width) // 2)
    step = tile // 2
    best, best_area = None, 0.0
    for top in sorted({*range(0, height - tile + 1, step), height - tile}):
        for left in sorted({*range(0, width - tile + 1, step), width - tile}):
            face = landmarker.detect(np.ascontiguousarray(image_rgb[top : top + tile, left : left + tile]))
            if face is not None:
                x0, y0, x1, y1 = face.bbox((tile, tile))
                area = (x1 - x0) * (y1 - y0)
                if area > best_area:
                    best, best_area = (x0 + left, y0 + top, x1 + left, y1 + top), area
    return best


# Arrays of one face per frame, in the clip format (aniportrait.data.clip.LANDMARK_ARRAYS).
_PER_FRAME_SHAPES: dict[str, tuple[int, ...]] = {
    "lmks": (478, 3),
    "mesh3d": (468, 3),
    "trans_mat": (4, 4),
    "blendshapes": (52,),
}


def fill_invalid_frames(arrays: dict[str, np.ndarray], valid: np.ndarray, fill: str = "interpolate") -> dict[str, np.ndarray]:
    """Replace the values of frames with ``valid == False`` so that no array holds NaN.

    ``interpolate``: linear in time between the nearest valid frames, held constant before the first and
    after the last valid frame (``trans_mat`` element-wise, which stays close to a rotation for the short
    gaps a tracker leaves). ``zero``: zeros. With no valid frame at all every value is zero.
    """
    if fill not in ("interpolate", "zero"):
        raise AniPortraitError(f"fill must be 'interpolate' or 'zero', got {fill!r}")
    valid = np.asarray(valid, dtype=bool)
    filled = {}
    known = np.flatnonzero(valid)
    missing = np.flatnonzero(~valid)
    for key, array in arrays.items():
        array = np.array(array, dtype=np.float32)  # a copy: callers keep their arrays
        if len(missing):
            if fill == "zero" or len(known) == 0:
                array[missing] = 0.0
            else:
                flat = array.reshape(len(array), -1)
                position = np.searchsorted(known, missing)
                left = known[np.maximum(position - 1, 0)]
                right = known[np.minimum(position, len(known) - 1)]
                # Before the first and after the last valid frame both neighbours are one frame: a hold.
                left = np.where(position == 0, right, left)
                right = np.where(position == len(known), left, right)
                span = right - left
                weight = np.where(span > 0, (missing - left) / np.maximum(span, 1), 0.0)[:, None]
                flat[missing] = ((1.0 - weight) * flat[left] + weight * flat[right]).astype(np.float32)
        filled[key] = array
    return filled


class LandmarkSequence:
    """Collect a video's landmarks frame by frame in VIDEO mode; ``arrays()`` gives the clip format.

    Timestamps are ``round(i * 1000 / fps)`` ms, as the reference landmarks in shared/samples were made.
    ``num_faces`` (T,) int16 records how many faces MediaPipe saw in each frame (0 where none).
    """

    def __init__(self, landmarker: FaceLandmarker, fps: float):
        if landmarker.mode != "video":
            raise AniPortraitError("LandmarkSequence needs a FaceLandmarker(mode='video')")
        if not fps or fps <= 0:
            raise AniPortraitError(f"LandmarkSequence needs a positive frame rate, got {fps!r}")
        self.landmarker = landmarker
        self.fps = float(fps)
        self._faces: list[FaceFrame | None] = []

    def __len__(self) -> int:
        return len(self._faces)

    def add(self, frame_rgb: np.ndarray) -> FaceFrame | None:
        """Detect the face in the next frame (RGB uint8 (H, W, 3))."""
        timestamp_ms = round(len(self._faces) * 1000.0 / self.fps)
        face = self.landmarker.detect(frame_rgb, timestamp_ms)
        self._faces.append(face)
        return face

    def extend(self, frames_rgb: Iterable[np.ndarray]) -> None:
        for frame in frames_rgb:
            self.add(frame)

    def arrays(self, fill: str = "interpolate") -> dict[str, np.ndarray]:
        """lmks (T,478,3), mesh3d (T,468,3), trans_mat (T,4,4), blendshapes (T,52), valid (T,), num_faces (T,)."""
        frames = len(self._faces)
        valid = np.array([face is not None for face in self._faces], dtype=bool)
        arrays = {key: np.zeros((frames, *shape), dtype=np.float32) for key, shape in _PER_FRAME_SHAPES.items()}
        for index, face in enumerate(self._faces):
            if face is not None:
                for key in _PER_FRAME_SHAPES:
                    arrays[key][index] = getattr(face, key)
        arrays = fill_invalid_frames(arrays, valid, fill)
        arrays["valid"] = valid
        arrays["num_faces"] = np.array([0 if face is None else face.num_faces for face in self._faces], dtype=np.int16)
        return arrays


def detect_video(
    frames_rgb: Iterable[np.ndarray],
    fps: float,
    model_path: str | os.PathLike | None = None,
    max_faces: int = 1,
    fill: str = "interpolate",
) -> dict[str, np.ndarray]:
    """Landmarks of every frame of a video (RGB uint8 frames, any iterable) in VIDEO mode.

    Returns the clip-format arrays (see :meth:`LandmarkSequence.arrays`); invalid frames are filled, not NaN.
    """
    with FaceLandmarker(model_path, mode="video", max_faces=max_faces) as landmarker:
        sequence = LandmarkSequence(landmarker, fps)
        sequence.extend(frames_rgb)
        return sequence.arrays(fill)


def detect_video_file(
    path: str | os.PathLike,
    model_path: str | os.PathLike | None = None,
    max_faces: int = 1,
    fill: str = "interpolate",
    max_frames: int | None = None,
    chunk_frames: int = 64,
) -> tuple[dict[str, np.ndarray], float]:
    """Landmarks of every frame of a video file, decoded with decord in chunks; returns (arrays, fps).

    The file's own frames are used (no resampling; decord applies rotation metadata); ``max_frames``
    keeps only the first frames. A video in which no frame shows a face is an error.
    """
    import decord

    path = Path(path)
    if not path.is_file():
        raise AniPortraitError(f"video file not found: {path}; check the path")
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        fps = float(reader.get_avg_fps())
    except Exception as error:  # noqa: BLE001 - decord raises DECORDError and RuntimeError
        raise AniPortraitError(f"cannot decode video {path} ({error}); the file is corrupt or truncated") from error
    total = len(reader) if max_frames is None else min(len(reader), int(max_frames))

    def frames() -> Iterable[np.ndarray]:
        for start in range(0, total, chunk_frames):
            yield from reader.get_batch(list(range(start, min(total, start + chunk_frames)))).asnumpy()

    arrays = detect_video(frames(), fps, model_path, max_faces, fill)
    if not arrays["valid"].any():
        raise AniPortraitError(f"no face found in {path}; give a video that shows a face (a talking head)")
    return arrays, fps
