"""The end-of-training check of stage B: re-animate clips it never trained on, and say whether that beats copying.

For every clip of the test split (or the first ``num_videos``): the reference is the clip's first frame with a face,
the driver its own ground-truth landmarks drawn as pose images, sampled through the trained module's pipeline
(``sampling_pipeline``: the same code inference runs). Scores, averaged over clips (frame 0, the reference itself,
left out of both rows, where copying would score a perfect frame):

    video/test/psnr, video/test/ssim                                generated vs ground truth
    video/test/psnr_copy_reference, video/test/ssim_copy_reference  the reference frame repeated vs ground truth

and a frame strip PNG (rows: ground truth | generated | copy baseline; columns: frames spread over the clip) per
clip. ``train.py`` runs it after the last stage-B stage (``held_out_videos`` in conf/train.yaml).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from aniportrait.errors import AniPortraitError
from aniportrait.metrics.pixel import psnr_per_frame, ssim_per_frame
from aniportrait.utils.atomic import atomic_path

__all__ = ["held_out_video_metrics", "frame_strip"]

log = logging.getLogger(__name__)


def frame_strip(rows: Mapping[str, np.ndarray], columns: int = 6, height: int | None = None) -> np.ndarray:
    """(H', W', 3) uint8: one row per named video (T, H, W, 3), ``columns`` frames spread evenly over T, each row
    labelled with its name."""
    videos = list(rows.values())
    count = min(len(video) for video in videos)
    picks = np.linspace(0, count - 1, min(columns, count)).round().astype(int)
    lines = []
    for name, video in rows.items():
        tiles = [video[index] for index in picks]
        if height and tiles[0].shape[0] != height:
            tiles = [cv2.resize(tile, (round(tile.shape[1] * height / tile.shape[0]), height), interpolation=cv2.INTER_AREA)
                     for tile in tiles]
        line = np.concatenate(tiles, axis=1).copy()
        scale = min(0.4, tiles[0].shape[0] / 256)  # small tiles get small labels
        origin = (3, 4 + round(20 * scale))
        cv2.putText(line, name, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 2, cv2.LINE_AA)
        cv2.putText(line, name, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
        lines.append(line)
    return np.concatenate(lines, axis=0)


def _write_png(path: Path, image: np.ndarray) -> Path:
    with atomic_path(path) as tmp:  # the temporary name keeps the .png suffix cv2 picks the format from
        if not cv2.imwrite(str(tmp), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise AniPortraitError(f"cannot write {path}")
    return path


@torch.no_grad()
def held_out_video_metrics(module: Any, datamodule: Any, out_dir: str | Path, num_videos: int | None = None,
                           num_frames: int = 32, num_inference_steps: int | None = None,
                           guidance_scale: float | None = None, seed: int = 0, strip_columns: int = 6,
                           progress: bool = False) -> dict[str, float]:
    """Generate the test clips with ``module`` (a stage-B LightningModule) and score them; see the module docstring.

    datamodule: a set-up :class:`aniportrait.data.video_frames.VideoFrameDataModule` with a test split.
    Writes ``out_dir/held_out_strip_<clip>.png``. Returns the metrics (means over clips).
    """
    previews = datamodule.preview_samples(num_videos, num_frames, split="test")
    if not previews:
        raise AniPortraitError("held-out videos: the test split has no clips")
    sampling = module.sampling
    steps = int(num_inference_steps or sampling["num_inference_steps"])
    guidance = float(sampling["guidance_scale"] if guidance_scale is None else guidance_scale)
    pipeline = module.sampling_pipeline()
    was_training = module.training
    module.eval()
    scores: dict[str, list[float]] = {"psnr": [], "ssim": [], "psnr_copy_reference": [], "ssim_copy_reference": []}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        autocast = torch.autocast(device_type=module.device.type, dtype=torch.bfloat16,
                                  enabled=module.device.type == "cuda")
        with autocast:
            for index, preview in enumerate(previews):
                if len(preview["frames"]) < 2:
                    log.warning("held-out videos: clip %s has fewer than 2 frames; not scored", preview["clip_id"])
                    continue
                frames = pipeline(
                    preview["reference_image"], preview["pose_images"], preview["reference_pose"],
                    num_inference_steps=steps, guidance_scale=guidance, context_frames=sampling["context_frames"],
                    context_overlap=sampling["context_overlap"], generator=torch.Generator().manual_seed(seed + index),
                    progress=progress,
                )  # (T, H, W, 3)
                truth = preview["frames"]
                copy = np.broadcast_to(preview["reference_image"], truth.shape)
                generated_t, truth_t, copy_t = (torch.from_numpy(np.ascontiguousarray(video[1:]))
                                                for video in (frames, truth, copy))
                scores["psnr"].append(float(psnr_per_frame(generated_t, truth_t).mean()))
                scores["ssim"].append(float(ssim_per_frame(generated_t, truth_t).mean()))
                scores["psnr_copy_reference"].append(float(psnr_per_frame(copy_t, truth_t).mean()))
                scores["ssim_copy_reference"].append(float(ssim_per_frame(copy_t, truth_t).mean()))
                strip = frame_strip({"ground truth": truth, "generated": frames, "copy reference": copy},
                                    columns=strip_columns)
                _write_png(out_dir / f"held_out_strip_{preview['clip_id']}.png", strip)
    finally:
        module.train(was_training)
    if not scores["psnr"]:
        raise AniPortraitError("held-out videos: no test clip had the 2 frames scoring needs")
    return {f"video/test/{name}": float(np.mean(values)) for name, values in scores.items()}
