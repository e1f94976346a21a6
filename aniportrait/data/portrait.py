"""A prepared clip's frame as the portrait to animate (the clip format of GUIDE section 3: landmarks.npz beside
video.mp4): what self-reenactment and landmark-driven runs start from."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from aniportrait.data.clip import load_landmarks
from aniportrait.data.video import read_video
from aniportrait.errors import AniPortraitError
from aniportrait.face.portrait import Portrait, resize_square

__all__ = ["portrait_from_landmarks_npz"]


def portrait_from_landmarks_npz(
    path: str | os.PathLike,
    frame: int = 0,
    size: int | None = None,
    video: str | os.PathLike | None = None,
) -> Portrait:
    """A prepared clip's frame as the portrait: landmarks from its ``landmarks.npz``, pixels from its video.

    ``video`` defaults to ``video.mp4`` beside the npz (the clip format). ``size`` resizes the (square)
    frame; normalised landmarks, the mesh and the camera of a square image do not change with its size.
    Without a video (landmarks only), the image is black: enough for landmark-only modes.
    """
    path = Path(path)
    arrays = load_landmarks(path)
    frames = len(arrays["valid"])
    if not 0 <= frame < frames:
        raise AniPortraitError(f"{path} has {frames} frames; frame={frame} is out of range (use 0..{frames - 1})")
    if not arrays["valid"][frame]:
        valid = np.flatnonzero(arrays["valid"])
        hint = f"use a valid frame, e.g. {int(valid[0])}" if len(valid) else "this clip has no face at all"
        raise AniPortraitError(f"{path}: frame {frame} has no detected face; {hint}")
    video = Path(video) if video is not None else path.with_name("video.mp4")
    if not video.is_file():
        side = size or 512
        image = np.zeros((side, side, 3), dtype=np.uint8)
    else:
        image = read_video(video, [frame])[0]
    if image.shape[0] != image.shape[1]:
        raise AniPortraitError(f"{video} is {image.shape[1]}x{image.shape[0]}; clip videos are square face crops")
    if size is not None and size != image.shape[0]:
        image = resize_square(image, size)
    return Portrait(
        image=image,
        lmks=arrays["lmks"][frame].astype(np.float32),
        mesh3d=arrays["mesh3d"][frame].astype(np.float32),
        trans_mat=arrays["trans_mat"][frame].astype(np.float32),
        blendshapes=arrays["blendshapes"][frame].astype(np.float32),
        source=f"{path}#frame={frame}",
        crop_box=(0, 0, image.shape[1], image.shape[0]),
    )
