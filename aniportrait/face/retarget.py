"""Video-driven retargeting: a driving video's expression and head motion on a portrait's face.

The official ``vid2vid`` adds the driver's mesh deformation to the reference face
(``verts - verts[reference] + ref_lmks3d``) and projects it with the driver's own camera matrices. We keep
the expression transfer and move the head motion onto the portrait's camera instead, as the audio path
does: each driving frame's pose relative to the driver's first valid frame is composed on the portrait's
``trans_mat`` (``trans_mat @ M(pose6)``), so the animation starts from the portrait's own framing and
pose rather than jumping to the driver's. Expression reference: the driver's first valid frame by default;
``expression_reference="neutral"`` picks the frame with the smallest blendshape sum, the official choice.

Pose modes: ``driver`` (the driver's head motion), ``portrait`` (the portrait's pose throughout),
``template`` (an official ``pose_temp.npy``, (N, 6) Euler xyz degrees + translation, mirrored and cycled
to the video's length as the official ``audio2vid`` does).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aniportrait.errors import AniPortraitError
from aniportrait.face.geometry import project_points, relative_pose6, smooth_pose_sequence
from aniportrait.face.portrait import Portrait
from aniportrait.utils.files import read_arrays

__all__ = ["Retargeted", "POSE_MODES", "retarget", "load_pose_template", "cycle_pose_template"]

POSE_MODES = ("driver", "portrait", "template")


@dataclass
class Retargeted:
    """Per-frame meshes, poses and their projection for one output video."""

    meshes: np.ndarray  # (T, 468, 3) canonical meshes: portrait mesh + driver expression offsets
    poses: np.ndarray  # (T, 6) Euler xyz degrees + translation, relative to the portrait's trans_mat
    landmarks_2d: np.ndarray  # (T, 468, 2) pixel (x, y) in an image of image_size
    image_size: tuple[int, int]  # (height, width)
    expression_reference: int  # the driving frame whose mesh counts as "no expression"

    def normalized_landmarks(self) -> np.ndarray:
        """(T, 468, 2) landmarks as fractions of the image width and height."""
        height, width = self.image_size
        return self.landmarks_2d / np.array([width, height], dtype=np.float64)


def load_pose_template(path_or_array: str | os.PathLike | np.ndarray) -> np.ndarray:
    """An official pose template (N, 6) float64, from a ``.npy`` path or an array."""
    if isinstance(path_or_array, np.ndarray):
        template, name = path_or_array, "pose template array"
    else:
        path = Path(path_or_array)
        if not path.is_file():
            raise AniPortraitError(f"pose template not found: {path}; give an official pose_temp.npy (N, 6)")
        arrays = read_arrays(path, "pose template (an official pose_temp.npy, N x 6)")
        if len(arrays) != 1:
            raise AniPortraitError(f"pose template {path} holds {sorted(arrays)}; give a .npy file of one (N, 6) array")
        template = next(iter(arrays.values()))
        name = str(path)
    template = np.asarray(template, dtype=np.float64)
    if template.ndim != 2 or template.shape[1] != 6 or len(template) == 0:
        raise AniPortraitError(
            f"{name} has shape {template.shape}; a pose template is (N, 6): Euler xyz degrees + translation per frame"
        )
    if not np.isfinite(template).all():
        raise AniPortraitError(f"{name} holds NaN or infinite values")
    return template


def cycle_pose_template(template: np.ndarray, frames: int) -> np.ndarray:
    """Play the template forwards then backwards (no repeated end frames), repeated to ``frames`` rows."""
    mirrored = np.concatenate([template, template[-2:0:-1]], axis=0)  # (2N - 2, 6)
    repeats = frames // len(mirrored) + 1
    return np.tile(mirrored, (repeats, 1))[:frames]


def _expression_reference(driving: Mapping[str, np.ndarray], valid: np.ndarray, choice: str | int) -> int:
    valid_frames = np.flatnonzero(valid)
    if isinstance(choice, str) and choice == "first":
        return int(valid_frames[0])
    if isinstance(choice, str) and choice == "neutral":
        if "blendshapes" not in driving:
            raise AniPortraitError("expression_reference='neutral' needs the driver's blendshapes (T, 52)")
        activity = np.asarray(driving["blendshapes"], dtype=np.float64)[:, 1:].sum(axis=1)  # index 0 is _neutral
        return int(valid_frames[np.argmin(activity[valid_frames])])
    if isinstance(choice, int | np.integer) and not isinstance(choice, bool):
        if not 0 <= choice < len(valid) or not valid[choice]:
            raise AniPortraitError(
                f"expression_reference={choice} is not a valid driving frame (valid frames: "
                f"{int(valid_frames[0])}..{int(valid_frames[-1])}, {len(valid_frames)} in all)"
            )
        return int(choice)
    raise AniPortraitError(f"expression_reference must be 'first', 'neutral' or a frame index, got {choice!r}")


def retarget(
    portrait: Portrait,
    driving: Mapping[str, np.ndarray],
    pose: str = "driver",
    pose_template: str | os.PathLike | np.ndarray | None = None,
    image_size: tuple[int, int] | None = None,
    expression_reference: str | int = "first",
    pose_smooth_window: int = 1,
    mesh_smooth_window: int = 1,
) -> Retargeted:
    """Transfer a driving video's landmarks (clip-format arrays) onto ``portrait``.

    driving: ``mesh3d`` (T, 468, 3) and ``trans_mat`` (T, 4, 4), optionally ``valid`` (T,) and
    ``blendshapes`` (T, 52), e.g. from ``detect_video_file`` or a clip's ``landmarks.npz``.
    image_size: (height, width) of the projection; the portrait's image size by default.
    ``*_smooth_window`` > 1: centred moving mean over time (the official pose smoothing).
    """
    if pose not in POSE_MODES:
        raise AniPortraitError(f"pose must be one of {POSE_MODES}, got {pose!r}")
    for key in ("mesh3d", "trans_mat"):
        if key not in driving:
            raise AniPortraitError(f"driving landmarks lack {key!r}; give clip-format arrays (mesh3d, trans_mat, valid)")
    driver_meshes = np.asarray(driving["mesh3d"], dtype=np.float64)  # (T, 468, 3)
    driver_trans = np.asarray(driving["trans_mat"], dtype=np.float64)  # (T, 4, 4)
    frames = len(driver_meshes)
    if driver_meshes.shape[1:] != (468, 3) or driver_trans.shape != (frames, 4, 4):
        raise AniPortraitError(
            f"driving mesh3d {driver_meshes.shape} / trans_mat {driver_trans.shape} do not match (T, 468, 3) / (T, 4, 4)"
        )
    valid = np.asarray(driving.get("valid", np.ones(frames, dtype=bool)), dtype=bool)
    if frames == 0 or not valid.any():
        raise AniPortraitError("the driving video has no frame with a detected face; nothing to retarget")

    reference = _expression_reference(driving, valid, expression_reference)
    meshes = portrait.mesh3d.astype(np.float64) + (driver_meshes - driver_meshes[reference])  # (T, 468, 3)
    if mesh_smooth_window > 1:
        meshes = smooth_pose_sequence(meshes, mesh_smooth_window)

    if pose == "driver":
        poses = relative_pose6(driver_trans, driver_trans[np.flatnonzero(valid)[0]])  # (T, 6)
    elif pose == "portrait":
        poses = np.zeros((frames, 6))
    else:
        if pose_template is None:
            raise AniPortraitError("pose='template' needs pose_template=PATH to an official pose_temp.npy (N, 6)")
        poses = cycle_pose_template(load_pose_template(pose_template), frames)
    if pose_smooth_window > 1:
        poses = smooth_pose_sequence(poses, pose_smooth_window)

    size = tuple(portrait.image.shape[:2]) if image_size is None else (int(image_size[0]), int(image_size[1]))
    landmarks_2d = project_points(meshes, portrait.trans_mat, poses, size)  # (T, 468, 2)
    return Retargeted(meshes.astype(np.float32), poses, landmarks_2d, size, reference)
