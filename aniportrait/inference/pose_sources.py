"""Pose images, rendered chunk by chunk on demand (only a chunk is ever in memory): projected meshes and poses,
2-D landmarks of a .npz, or the frames of a pose-image video (mode=pose input)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from aniportrait.audio.io import load_audio
from aniportrait.data.video import probe_video
from aniportrait.errors import AniPortraitError
from aniportrait.face.drawing import draw_landmarks
from aniportrait.face.geometry import project_points
from aniportrait.face.portrait import Portrait
from aniportrait.inference.motion import Motion
from aniportrait.inference.options import AnimationOptions, resampled_indices
from aniportrait.utils.files import read_arrays

__all__ = ["PoseFrames", "MeshPoseFrames", "LandmarkPoseFrames", "VideoPoseFrames", "KeyframePoseImages",
           "draw_pose_images", "pose_frames_from_file"]

class PoseFrames(Protocol):
    """A sequence of pose images rendered on demand (only a chunk at a time is ever in memory)."""

    size: tuple[int, int]  # (height, width)

    def __len__(self) -> int: ...

    def render(self, indices: np.ndarray) -> np.ndarray:
        """(n,) frame indices -> (n, H, W, 3) uint8 pose images."""
        ...


def draw_pose_images(normalized: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, N, 2) landmarks in [0, 1] -> (n, H, W, 3) uint8 pose images."""
    return np.stack([draw_landmarks(points, image_size=size, normalized=True) for points in normalized])


class MeshPoseFrames:
    """Meshes and poses projected with the portrait's camera. The portrait is square, so landmarks are projected
    into the unit square and drawn at (H, W): a non-square output stretches pose images and portrait alike."""

    def __init__(self, motion: Motion, portrait: Portrait, size: tuple[int, int]):
        self.meshes, self.poses, self.trans_mat, self.size = motion.meshes, motion.poses, portrait.trans_mat, size

    def __len__(self) -> int:
        return len(self.meshes)

    def normalized(self, indices: np.ndarray) -> np.ndarray:
        """(n,) -> (n, 468, 2) landmarks as fractions of the image width and height."""
        return project_points(self.meshes[indices], self.trans_mat, self.poses[indices], image_size=(1, 1))

    def render(self, indices: np.ndarray) -> np.ndarray:
        return draw_pose_images(self.normalized(indices), self.size)


class LandmarkPoseFrames:
    """2-D landmarks given as fractions of the image size (a landmarks .npz)."""

    def __init__(self, normalized: np.ndarray, size: tuple[int, int]):
        self.landmarks, self.size = normalized, size  # (T, N, 2)

    def __len__(self) -> int:
        return len(self.landmarks)

    def render(self, indices: np.ndarray) -> np.ndarray:
        return draw_pose_images(self.landmarks[indices], self.size)


class VideoPoseFrames:
    """Frames of a pose-image video, decoded at (H, W) when asked for."""

    def __init__(self, path: Path, indices: np.ndarray, size: tuple[int, int]):
        self.path, self.indices, self.size = path, indices, size

    def __len__(self) -> int:
        return len(self.indices)

    def render(self, indices: np.ndarray) -> np.ndarray:
        from aniportrait.data.video import read_video

        return read_video(self.path, self.indices[indices], size=self.size)


class KeyframePoseImages:
    """The pose images of frames ``keys`` as the pipeline asks for them: ``[indices]`` (into ``keys``) draws just
    those (the pipeline fetches one context window at a time)."""

    def __init__(self, pose_frames: PoseFrames, keys: np.ndarray):
        self.pose_frames, self.keys = pose_frames, np.asarray(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, indices: np.ndarray) -> np.ndarray:
        return self.pose_frames.render(self.keys[np.asarray(indices)])


def pose_frames_from_file(path: str | os.PathLike, size: tuple[int, int], options: AnimationOptions,
                          default_fps: float) -> tuple[PoseFrames, float, np.ndarray | None]:
    """mode=pose input: a pose-image video (its audio muxed), mode=landmarks' .npz (``landmarks`` in pixels of
    ``image_size``, ``fps``) or a clip's landmarks.npz (``lmks`` in [0, 1]; ``default_fps`` unless fps= is given).
    Returns the frames, their fps and the audio to mux (or None)."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise AniPortraitError(f"pose input not found: {path}; give a pose-image video or a landmarks .npz")
    if path.suffix != ".npz":
        import decord

        info = probe_video(path)
        try:
            source_frames = len(decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1))
        except Exception as error:  # noqa: BLE001 - decord raises DECORDError and RuntimeError
            raise AniPortraitError(f"cannot decode video {path} ({error}); the file is corrupt or truncated") from error
        indices = resampled_indices(source_frames, info.fps, options.fps, options.length)
        audio = load_audio(path) if info.has_audio else None
        return VideoPoseFrames(path, indices, size), float(options.fps or info.fps), audio
    content = read_arrays(path, "pose input", finite=("landmarks", "lmks", "image_size", "fps"))
    if "landmarks" in content and "image_size" in content:  # mode=landmarks output
        height, width = (int(value) for value in content["image_size"])
        normalized = content["landmarks"][..., :2] / np.array([width, height], dtype=np.float32)
        source_fps = float(content.get("fps", default_fps))
    elif "lmks" in content:  # clip format
        normalized, source_fps = content["lmks"][:, :468, :2], float(default_fps)
    else:
        raise AniPortraitError(f"{path} holds {sorted(content)}; a pose .npz is mode=landmarks output (landmarks, "
                               "image_size, fps) or a clip's landmarks.npz (lmks)")
    if normalized.ndim != 3 or normalized.shape[1] < 468 or not len(normalized):
        raise AniPortraitError(f"{path}: landmarks have shape {normalized.shape}; expected (T, 468+, 2) with T > 0")
    indices = resampled_indices(len(normalized), source_fps, options.fps, options.length)
    return LandmarkPoseFrames(normalized[indices], size), float(options.fps or source_fps), None

