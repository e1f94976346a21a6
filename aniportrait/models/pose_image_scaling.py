"""The value range of pose images fed to the PoseGuider: an explicit setting, because official code uses two.

* ``"unit"``: ``x / 255 * 2 - 1`` -> [-1, 1]. Official **training** does this: ``FaceDataset`` divides the
  drawn pose images by 255 and applies ``Normalize(0.5, 0.5)`` (``src/dataset/dataset_face.py``), and
  ``train_stage_1.py`` / ``train_stage_2.py`` pass them to the PoseGuider unchanged.
* ``"official_inference"``: ``x * 2 - 1`` on the raw uint8 values -> [-1, 509]. Official **inference**
  (``scripts/pose2vid.py``, ``audio2vid.py``, ``vid2vid.py`` -> ``Pose2VideoPipeline`` in
  ``pipeline_pose2vid_long.py``) hands the pose frames and the reference pose to
  ``VaeImageProcessor(do_normalize=True).preprocess`` as uint8 numpy arrays; diffusers' numpy path does not
  divide by 255 (only PIL input is), so the ``2x - 1`` normalisation sees 0..255.

Which one the released ``pose_guider.pth`` expects: it was trained with ``"unit"`` inputs (the released
training code), but every published AniPortrait result was generated with ``"official_inference"``. To
reproduce the official outputs with the official weights use ``"official_inference"``; for models trained
here (and by the official training scripts) use ``"unit"``, which matches how they were trained.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from aniportrait.errors import AniPortraitError
from aniportrait.utils.pixels import float32_copy

__all__ = ["PoseImageScaling", "POSE_IMAGE_SCALINGS", "scale_pose_images"]

PoseImageScaling = Literal["official_inference", "unit"]
POSE_IMAGE_SCALINGS: tuple[str, ...] = ("official_inference", "unit")


def scale_pose_images(pose_images: torch.Tensor | np.ndarray, mode: PoseImageScaling) -> torch.Tensor:
    """Map pose images with values 0..255 (uint8, or float holding 0..255) to the PoseGuider's input range.

    The layout is left as given (e.g. ``(b, 3, f, H, W)``); the result is float32 (or the input's
    floating dtype). ``mode`` is ``"unit"`` ([-1, 1], official training) or ``"official_inference"``
    ([-1, 509], what the official inference pipeline feeds the released weights).
    """
    if mode not in POSE_IMAGE_SCALINGS:
        raise AniPortraitError(f"pose image scaling {mode!r} is unknown: expected one of {POSE_IMAGE_SCALINGS}")
    images = torch.as_tensor(pose_images)
    if not images.is_floating_point():  # a fresh contiguous buffer, then the same operations in place (same values)
        images = float32_copy(images)
        if mode == "unit":
            images.div_(255.0)
        return images.mul_(2.0).sub_(1.0)
    if mode == "unit":
        images = images / 255.0
    return images * 2.0 - 1.0
