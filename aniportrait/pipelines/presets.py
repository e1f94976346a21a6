"""Sampling presets: every choice of stage-B sampling that changes the frames besides the weights, the inputs, the
size, the steps, the guidance scale, the scheduler and the seed.

``official`` reproduces the official ``pipeline_pose2vid_long.Pose2VideoPipeline`` (Zejun-Yang/AniPortrait) as
``scripts/pose2vid.py`` calls it, checked against fixtures made by that code (tests/fixtures/official):

* reference for the VAE: diffusers ``VaeImageProcessor`` (PIL LANCZOS to the output size, ``x / 255 * 2 - 1``);
* reference for CLIP: the ORIGINAL reference stretched to 224 x 224 with PIL bicubic, then the CLIP image processor
  (whose own resize and crop leave a 224 x 224 image as it is);
* pose images of another size than the output: nearest-neighbour on the uint8 values (what ``VaeImageProcessor``
  does to numpy input), then the ``official_inference`` value range;
* the ``uniform`` context schedule (:mod:`aniportrait.pipelines.context`), the ReferenceNet run on the
  ``[unconditional; conditional]`` batch, its bank kept in float16 (``ReferenceAttentionControl.update``'s default),
  latents in the image encoder's dtype, classifier-free guidance only for ``guidance_scale > 1``;
* frames as ``uint8(255 * clamp(x / 2 + 0.5, 0, 1))`` (truncated, as ``save_videos_grid``);
* the whole UNet at every step (``deep_cache_interval`` 1).

``project`` (the default for models trained here): cv2 area resampling of the reference (CLIP sees that resized
reference through its processor) and of the pose images, the ``blended`` context schedule (linear ramps, last
window at the end, ``context_frames=auto`` possible), a float32 reference bank from a conditional-only ReferenceNet
run, float32 latents, rounded uint8 frames, and the whole UNet only every 2nd step (``deep_cache_interval`` 2: in
between, its top level runs on the deep features of the step before; DeepCache). On trained weights (the learning
benchmark's real clips) that gave 40.5 dB against the frames of the whole UNet at every step and 0.01 dB less
against ground truth, for 1.26x at SD-1.5 shapes (benchmarks/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from aniportrait.errors import AniPortraitError

__all__ = ["SamplingPreset", "SAMPLING_PRESETS", "sampling_preset", "resize_images", "to_uint8"]

OFFICIAL_CLIP_SIZE = 224  # pipeline_pose2vid_long: ref_image.resize((224, 224)) before the CLIP processor


@dataclass(frozen=True)
class SamplingPreset:
    """How stage B samples (see the module docstring for the two presets)."""

    name: str
    context_schedule: str  # "blended" | "uniform" (aniportrait.pipelines.context)
    reference_resampling: str  # "area": cv2 INTER_AREA (INTER_LINEAR to enlarge) | "lanczos": VaeImageProcessor
    clip_input: str  # "resized_reference": the VAE's reference | "stretched_source": the original at 224 x 224
    pose_resampling: str  # "area": as the reference | "nearest": nearest-neighbour
    reference_bank_dtype: torch.dtype | None  # None: the ReferenceNet's own; the official reader keeps float16
    unconditional_reference_pass: bool  # the ReferenceNet also runs with the zero CLIP embedding (official batch)
    latents_dtype: str  # "float32" | "image_encoder" (the official prepare_latents)
    guidance_above_one: bool  # CFG only for guidance_scale > 1 (official) instead of != 1
    frames_to_uint8: str  # "round" | "truncate"
    deep_cache_interval: int  # the whole UNet every N-th step, its top level between (1: every step)


SAMPLING_PRESETS: dict[str, SamplingPreset] = {
    "project": SamplingPreset("project", "blended", "area", "resized_reference", "area", None, False, "float32",
                              False, "round", 2),
    "official": SamplingPreset("official", "uniform", "lanczos", "stretched_source", "nearest", torch.float16, True,
                               "image_encoder", True, "truncate", 1),
}


def sampling_preset(preset: str | SamplingPreset) -> SamplingPreset:
    if isinstance(preset, SamplingPreset):
        return preset
    if preset not in SAMPLING_PRESETS:
        raise AniPortraitError(f"sampling preset {preset!r}: choose one of {', '.join(SAMPLING_PRESETS)} "
                               "(sampling= in infer.py)")
    return SAMPLING_PRESETS[preset]


def resize_images(images: np.ndarray, height: int, width: int, resampling: str) -> np.ndarray:
    """(n, h, w, 3) uint8 -> (n, height, width, 3) uint8 with ``area`` (cv2), ``nearest`` (torch's default
    ``interpolate``, as diffusers' VaeImageProcessor on arrays) or ``lanczos`` (PIL, as on PIL images)."""
    if images.shape[1:3] == (height, width):
        return images
    if resampling == "area":
        interpolation = cv2.INTER_AREA if images.shape[1] > height else cv2.INTER_LINEAR
        return np.stack([cv2.resize(image, (width, height), interpolation=interpolation) for image in images])
    if resampling == "nearest":
        tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (n, 3, h, w) uint8
        return F.interpolate(tensor, size=(height, width)).permute(0, 2, 3, 1).numpy()
    if resampling == "lanczos":
        return np.stack([np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS)) for image in images])
    raise AniPortraitError(f"resampling {resampling!r}: expected area, nearest or lanczos")


def to_uint8(frames: torch.Tensor, rule: str) -> torch.Tensor:
    """Decoded frames in [-1, 1] (float) -> uint8: ``round`` to the nearest level, or ``truncate`` as the official
    ``save_videos_grid`` (``(clamp(x / 2 + 0.5, 0, 1) * 255).astype(uint8)``)."""
    if rule == "round":
        return ((frames + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if rule == "truncate":
        return ((frames / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    raise AniPortraitError(f"frames_to_uint8={rule!r}: expected round or truncate")
