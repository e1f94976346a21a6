"""Pass 2 for one clip: crop and resize the frames, landmark them in the crop, cut the audio, and write
the clip folder atomically (a temporary folder renamed into place), so a clip exists whole or not at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from aniportrait.audio.io import write_wav
from aniportrait.data.clip import clip_dir, save_landmarks
from aniportrait.data.prepare.config import PrepareConfig
from aniportrait.data.prepare.source import SourceVideo, audio_for_frames, chunk_frames, read_frames
from aniportrait.data.prepare.track import Segment
from aniportrait.data.video import VideoWriter
from aniportrait.face.landmarks import FaceLandmarker, LandmarkSequence
from aniportrait.utils.atomic import atomic_dir

__all__ = ["crop_square", "write_clip", "landmark_jitter", "audio_status", "audio_level_dbfs", "CLIP_INFO", "ClipRejected"]

CLIP_INFO = "clip.json"  # the clip's manifest record and QC entry; its presence marks a finished clip
_SILENCE_DBFS = -50.0  # a clip whose loudest 20 ms stay below this counts as silent (still valid audio)
_WINDOW = 320  # 20 ms at 16 kHz


class ClipRejected(Exception):
    """The clip failed a quality gate after its landmarks were computed; ``qc`` holds its QC entry."""

    def __init__(self, qc: dict):
        super().__init__(qc["reason"])
        self.qc = qc


def crop_square(frames: np.ndarray, crop_box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """(T, H, W, 3) -> (T, size, size, 3): the square ``crop_box``, black where it leaves the frame."""
    left, top, right, bottom = crop_box
    height, width = frames.shape[1:3]
    pad = max(0, -left, -top, right - width, bottom - height)
    if pad:
        frames = np.pad(frames, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    crops = frames[:, top + pad : bottom + pad, left + pad : right + pad]
    side = right - left
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return np.stack([cv2.resize(crop, (size, size), interpolation=interpolation) for crop in crops])


def landmark_jitter(lmks: np.ndarray, valid: np.ndarray, size: int) -> float | None:
    """Mean |second difference| of the 2-D landmarks over time, in output pixels (None: too few frames).

    Motion contributes too, but tracking noise dominates frame-to-frame second differences.
    """
    xy = lmks[:, :, :2].astype(np.float64) * size  # (T, 478, 2)
    triples = valid[:-2] & valid[1:-1] & valid[2:]
    if not triples.any():
        return None
    second = xy[2:] - 2 * xy[1:-1] + xy[:-2]  # (T - 2, 478, 2)
    return float(np.linalg.norm(second[triples], axis=-1).mean())


def audio_level_dbfs(samples: np.ndarray) -> float:
    """RMS level of the whole clip in dBFS, floored at -120 (digital silence)."""
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0
    return float(20 * np.log10(max(rms, 1e-6)))


def audio_status(samples: np.ndarray | None) -> str:
    """``none`` (no track), ``silent`` (loudest 20 ms below -50 dBFS) or ``present``.

    The loudest window, not the average, decides: quiet recordings with pauses have a low average level.
    """
    if samples is None:
        return "none"
    usable = len(samples) // _WINDOW * _WINDOW
    windows = samples[:usable].reshape(-1, _WINDOW) if usable else samples.reshape(1, -1)
    loudest = float(np.sqrt(np.max(np.mean(np.square(windows, dtype=np.float64), axis=1)))) if samples.size else 0.0
    return "silent" if loudest <= 10 ** (_SILENCE_DBFS / 20) else "present"


def _face_size_in_crop(lmks: np.ndarray, valid: np.ndarray, size: int) -> float:
    xy = lmks[valid, :, :2] * size
    if len(xy) == 0:
        return 0.0
    extent = np.maximum(np.ptp(xy[:, :, 0], axis=1), np.ptp(xy[:, :, 1], axis=1))
    return float(np.median(extent))


def write_clip(
    reader,
    source: SourceVideo,
    timeline: np.ndarray,
    segment: Segment,
    audio: np.ndarray | None,
    clip_id: str,
    root: Path,
    config: PrepareConfig,
) -> dict:
    """Write ``clips/<clip_id>/`` and return its QC entry (with the manifest record under ``record``).

    Raises ClipRejected (nothing written) when the clip fails a quality gate, and DecodeError when the
    source cannot be decoded.
    """
    fps = config.fps
    clip_audio = None if audio is None else audio_for_frames(audio, source, fps, segment.start, segment.frames)
    relative = Path("clips") / clip_id
    qc = {
        "id": clip_id,
        "source": source.key,
        "status": "kept",
        "reason": None,
        "start_s": round(segment.start / fps, 3),
        "end_s": round(segment.end / fps, 3),
        "frames": segment.frames,
        "crop_box": list(segment.crop_box),
        "face_size_px": round(segment.face_size, 1),
        "audio": audio_status(clip_audio),
        "audio_level_dbfs": None if clip_audio is None else round(audio_level_dbfs(clip_audio), 1),
        "warnings": list(segment.warnings),
    }
    with atomic_dir(clip_dir(root, clip_id), replace=True) as folder:  # a rerun redoes an unfinished source
        with VideoWriter(folder / "video.mp4", fps, crf=config.crf, preset=config.preset,
                         gop_size=config.gop_size) as writer:
            if clip_audio is not None and config.mux_audio:
                writer.set_audio(clip_audio)
            # One face, as the official code: the crop holds the tracked face, and looking for more would
            # re-run the detector every frame and move the landmarks (see aniportrait.face.landmarks).
            with FaceLandmarker(config.landmarker_model, mode="video", max_faces=1) as landmarker:
                sequence = LandmarkSequence(landmarker, fps)
                step = chunk_frames(source)
                for chunk_start in range(segment.start, segment.end, step):
                    indices = timeline[chunk_start : min(segment.end, chunk_start + step)]
                    crops = crop_square(read_frames(reader, indices), segment.crop_box, config.size)
                    writer.write(crops)
                    sequence.extend(crops)
            arrays = sequence.arrays()
            valid = arrays["valid"]
            qc["detection_rate"] = round(float(valid.mean()), 4)
            jitter = landmark_jitter(arrays["lmks"], valid, config.size)
            qc["jitter_px"] = None if jitter is None else round(jitter, 3)
            qc["face_size_crop_px"] = round(_face_size_in_crop(arrays["lmks"], valid, config.size), 1)
            if qc["detection_rate"] < config.min_detection_rate:
                qc["status"] = "rejected"
                qc["reason"] = (
                    f"detection rate {qc['detection_rate']:.2f} < min_detection_rate={config.min_detection_rate} in the crop"
                )
                raise ClipRejected(qc)
        if clip_audio is not None:
            write_wav(folder / "audio.wav", clip_audio)
        arrays["source_frames"] = timeline[segment.start : segment.end].astype(np.int32)
        arrays["crop_box"] = np.asarray(segment.crop_box, dtype=np.int32)
        save_landmarks(folder / "landmarks.npz", arrays)
        qc["record"] = {
            "id": clip_id,
            "fps": fps,
            "frames": segment.frames,
            "width": config.size,
            "height": config.size,
            "duration_s": round(segment.frames / fps, 6),
            "source": source.key,
            "video": str(relative / "video.mp4"),
            "landmarks": str(relative / "landmarks.npz"),
            "audio": None if clip_audio is None else str(relative / "audio.wav"),
            "start_s": qc["start_s"],
            "crop_box": qc["crop_box"],
            "detection_rate": qc["detection_rate"],
        }
        (folder / CLIP_INFO).write_text(json.dumps(qc, indent=1))
    return qc
