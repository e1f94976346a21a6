"""What drives the face: per-frame canonical meshes and head poses, from speech (the two swap points of
:class:`aniportrait.api.AniPortrait`: an :class:`AudioProcessor` and a :class:`MotionModel`) or from a driving
video (retargeted onto the portrait)."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from aniportrait.audio.io import SAMPLE_RATE, check_finite, frame_count, load_audio
from aniportrait.bundle import Bundle
from aniportrait.data.video import probe_video
from aniportrait.errors import AniPortraitError
from aniportrait.face.geometry import smooth_pose_sequence
from aniportrait.face.portrait import Portrait
from aniportrait.face.retarget import cycle_pose_template, load_pose_template
from aniportrait.inference.options import AnimationOptions, resampled_indices
from aniportrait.pipelines.landmarks import AudioToLandmarks, LandmarkPrediction

__all__ = ["ProcessedAudio", "AudioProcessor", "WaveformAudioProcessor", "MotionModel", "BundleMotionModel", "Motion",
           "motion_from_audio", "motion_from_video"]

log = logging.getLogger(__name__)


# -- swap point 1: audio processing --------------------------------------------------------------------------------


@dataclass
class ProcessedAudio:
    """What an audio processor hands the motion model."""

    samples: np.ndarray  # (S,) float32 mono at 16 kHz: the frame count's clock and the audio muxed into the output
    features: dict[str, Any] = field(default_factory=dict)  # anything else a custom motion model consumes


@runtime_checkable
class AudioProcessor(Protocol):
    """Raw speech -> :class:`ProcessedAudio`. Swap it to clean, trim or re-level speech, or to compute features
    for a custom motion model; the default motion model encodes ``samples`` with its own wav2vec2."""

    def process(self, source: str | os.PathLike | np.ndarray, sample_rate: int = SAMPLE_RATE) -> ProcessedAudio:
        """source: an audio (or video) file, or samples (S,) / (S, channels) at ``sample_rate``."""
        ...


class WaveformAudioProcessor:
    """The default: any file FFmpeg reads, or an array, as 16 kHz mono float32 (no features)."""

    def process(self, source: str | os.PathLike | np.ndarray, sample_rate: int = SAMPLE_RATE) -> ProcessedAudio:
        if not isinstance(source, np.ndarray):
            return ProcessedAudio(load_audio(source))
        from scipy.signal import resample_poly

        samples = np.asarray(source, dtype=np.float64)
        if samples.ndim == 2:
            samples = samples.mean(axis=1)
        if samples.ndim != 1 or not len(samples):
            raise AniPortraitError(f"audio array has shape {source.shape}; give samples (S,) or (S, channels), S > 0")
        check_finite(samples, "the audio array", int(sample_rate))
        if sample_rate != SAMPLE_RATE:
            ratio = Fraction(SAMPLE_RATE, int(sample_rate))
            samples = resample_poly(samples, ratio.numerator, ratio.denominator)
        return ProcessedAudio(np.clip(samples, -1.0, 1.0).astype(np.float32))


# -- swap point 2: the motion model --------------------------------------------------------------------------------


@runtime_checkable
class MotionModel(Protocol):
    """Speech + portrait -> per-frame canonical face meshes and head poses (stage A).

    ``predict`` returns a :class:`~aniportrait.pipelines.landmarks.LandmarkPrediction`: ``meshes`` (T, 468, 3) in
    the canonical metric space of ``portrait.mesh3d`` (the portrait's mesh plus the expression), ``poses`` (T, 6)
    Euler xyz degrees + translation relative to ``portrait.trans_mat`` (zeros: the portrait's own pose), and the
    ``fps`` of those frames (T should be ceil(duration x fps)). The pose images are these meshes projected with
    the portrait's camera.
    """

    fps: float  # frames per second of its output when predict gets no fps

    def predict(self, audio: ProcessedAudio, portrait: Portrait, *, fps: float | None = None,
                identity: int | str | None = None, pose_overrides: Mapping[str, Any] | None = None) -> LandmarkPrediction:
        """pose_overrides: ``rotation_scale`` / ``smooth_window`` asked for by the caller (a model may ignore them)."""
        ...


class BundleMotionModel:
    """The default: the bundle's Audio2Mesh (+ Audio2Pose), chunked for audio of any length."""

    def __init__(self, landmarks: AudioToLandmarks):
        self.landmarks = landmarks

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: str | torch.device = "cpu") -> BundleMotionModel:
        return cls(AudioToLandmarks.from_bundle(bundle, device))

    @property
    def fps(self) -> float:
        return self.landmarks.fps

    def predict(self, audio: ProcessedAudio, portrait: Portrait, *, fps: float | None = None,
                identity: int | str | None = None, pose_overrides: Mapping[str, Any] | None = None) -> LandmarkPrediction:
        trained_fps = self.landmarks.fps
        self.landmarks.fps = float(fps or trained_fps)  # AudioToLandmarks reads its fps for the frame clock
        try:
            frames = frame_count(len(audio.samples), self.landmarks.fps)
            # speech shorter than wav2vec2's receptive field (25 ms) cannot be encoded: pad it with silence
            samples = np.pad(audio.samples, (0, max(0, self._receptive_field() - len(audio.samples))))
            prediction = self.landmarks.predict(samples, portrait.mesh3d, identity=identity,
                                                pose_overrides=dict(pose_overrides or {}))
        finally:
            self.landmarks.fps = trained_fps
        return LandmarkPrediction(prediction.meshes[:frames], prediction.poses[:frames], prediction.fps)

    def _receptive_field(self) -> int:
        """Samples one output of the wav2vec2 convolution stack sees."""
        config = self.landmarks.audio2mesh.audio_encoder.config
        size, step = 1, 1
        for kernel, stride in zip(config.conv_kernel, config.conv_stride):
            size, step = size + (kernel - 1) * step, step * stride
        return size


# -- motion: per-frame meshes and head poses -----------------------------------------------------------------------


@dataclass
class Motion:
    """What drives the face: canonical meshes and poses per frame (projected with the portrait's camera)."""

    meshes: np.ndarray  # (T, 468, 3) canonical meshes
    poses: np.ndarray  # (T, 6) Euler xyz degrees + translation, relative to the portrait's trans_mat
    fps: float
    audio: np.ndarray | None  # (S,) 16 kHz mono to mux, or None


def _template_poses(options: AnimationOptions, frames: int) -> np.ndarray:
    if not options.pose_template:
        raise AniPortraitError("pose_source=template needs pose_template=PATH (pose.template= in infer.py), an official "
                               "pose_temp.npy")
    poses = cycle_pose_template(load_pose_template(options.pose_template), frames)
    return smooth_pose_sequence(poses, int(options.smooth_window)) if options.smooth_window else poses


def motion_from_audio(audio_processor: AudioProcessor, motion_model: MotionModel, portrait: Portrait,
                      audio: str | os.PathLike | np.ndarray, options: AnimationOptions) -> Motion:
    """Speech -> the motion model's meshes and poses (the pose source may replace the poses)."""
    if options.pose_source not in ("auto", "predicted", "still", "template"):
        raise AniPortraitError(f"pose source must be auto, predicted, still or template with speech, got {options.pose_source!r}")
    if options.pose_source == "template":
        _template_poses(options, 1)  # a bad template fails before the models run
    processed = audio_processor.process(audio)
    samples = np.asarray(processed.samples, dtype=np.float32)
    fps = float(options.fps or motion_model.fps)
    if options.length:  # encode only the speech the kept frames need (``features`` are left as they are)
        samples = samples[: max(1, math.floor(int(options.length) / fps * SAMPLE_RATE))]
        processed = dataclasses.replace(processed, samples=samples)
    overrides = {key: value for key, value in {"rotation_scale": options.rotation_scale,
                                               "smooth_window": options.smooth_window}.items() if value is not None}
    prediction = motion_model.predict(processed, portrait, fps=fps, identity=options.identity, pose_overrides=overrides)
    frames = len(prediction.meshes) if not options.length else min(len(prediction.meshes), int(options.length))
    if options.pose_source == "still":
        poses = np.zeros((frames, 6))
    elif options.pose_source == "template":
        poses = _template_poses(options, frames)
    else:
        poses = np.asarray(prediction.poses[:frames], dtype=np.float64)
    return Motion(np.asarray(prediction.meshes[:frames], dtype=np.float32), poses, float(prediction.fps), samples)


def faceless_frames(valid: np.ndarray) -> str:
    """Frames without a face as ranges: "12-30, 45" (frame numbers of the driving video, from 0)."""
    missing = np.flatnonzero(~np.asarray(valid, dtype=bool))
    if not len(missing):
        return ""
    breaks = np.flatnonzero(np.diff(missing) > 1)
    starts, ends = np.r_[missing[0], missing[breaks + 1]], np.r_[missing[breaks], missing[-1]]
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in zip(starts, ends))


def _report_faceless_frames(video: str | os.PathLike, valid: np.ndarray, fps: float) -> None:
    """A driving video that loses the face: which frames, and what was done there (one warning line)."""
    frames = faceless_frames(valid)
    if frames:
        count, total = int((~valid).sum()), len(valid)
        log.warning("driving video %s: no face in frames %s (%d of %d, first at %.2f s); there the expression and head "
                    "pose are interpolated between the nearest frames with a face (held before the first and after the "
                    "last one)", video, frames, count, total, float(np.argmin(valid)) / fps)


def motion_from_video(portrait: Portrait, video: str | os.PathLike, options: AnimationOptions,
                      landmarker_model: str | None = None) -> Motion:
    """A driving video's landmarks retargeted onto the portrait; the video's audio (if any) to mux."""
    from aniportrait.face.landmarks import detect_video_file
    from aniportrait.face.retarget import retarget

    modes = {"auto": "driver", "driver": "driver", "still": "portrait", "template": "template"}
    if options.pose_source not in modes:
        raise AniPortraitError(f"pose source must be auto, driver, still or template with a driving video, got "
                               f"{options.pose_source!r}")
    if options.pose_source == "template" and not options.pose_template:
        raise AniPortraitError("pose_source=template needs pose_template=PATH (pose.template= in infer.py), an official "
                               "pose_temp.npy")
    info = probe_video(video)
    needed = None
    if options.length:  # driving frames the kept output frames need
        needed = math.ceil(int(options.length) * info.fps / float(options.fps or info.fps)) + 1
    driving, source_fps = detect_video_file(video, model_path=landmarker_model, max_frames=needed)
    _report_faceless_frames(video, driving["valid"], source_fps)
    indices = resampled_indices(len(driving["mesh3d"]), source_fps, options.fps, options.length)
    driving = {key: value[indices] for key, value in driving.items()}
    result = retarget(portrait, driving, pose=modes[options.pose_source], pose_template=options.pose_template,
                      pose_smooth_window=int(options.smooth_window or 1))
    audio = load_audio(video) if info.has_audio else None
    return Motion(result.meshes, result.poses, float(options.fps or source_fps), audio)
