"""Generation: a portrait and a driver -> an H.264 mp4 with the driver's audio, streamed to disk chunk by chunk.

This module is the one implementation behind both ``python infer.py mode=...`` and :class:`aniportrait.api.AniPortrait`
(the entry point builds an ``AniPortrait`` and calls the method of its mode):

mode=audio      portrait + speech -> video: stage A (Audio2Mesh + Audio2Pose) -> pose images -> stage B; speech muxed
mode=video      portrait + driving video -> reenactment: the driver's expression and head motion retargeted onto
                the portrait (:mod:`aniportrait.face.retarget`) -> pose images -> stage B; the driver's audio muxed
mode=pose       portrait + a pose-image video, or a landmarks .npz (mode=landmarks output or a clip's) -> stage B
mode=landmarks  stage A alone: speech or a driving video + portrait -> the pose-image video (audio muxed) and the
                meshes, poses and 2-D landmarks as .npz beside it
mode=batch      a CSV / JSONL manifest of jobs of the modes above; finished outputs are skipped on rerun, a failing
                job is reported and the rest still run

Bounded memory for inputs of any length (10 minutes of speech): stage A is chunked
(:mod:`aniportrait.pipelines.landmarks`) and keeps only per-frame meshes and poses (~6 KB a frame); pose images are
drawn chunk by chunk; stage B samples ``chunk_frames`` frames per pipeline call and writes them with the incremental
:class:`~aniportrait.data.video.VideoWriter`. Neighbouring chunks share ``chunk_overlap`` frames that both generate
from the same pose images; those frames are cross-faded with weights ramping linearly from the earlier chunk to the
later one, so a chunk boundary is a short dissolve between two renderings of the same poses, never a cut. (Within
a chunk the pipeline's context windows blend in latent space at every step.)

Accelerated mode (``keyframe_interval=k``, the official ``-acc --fi_step``): only frames 0, k, 2k, ... and the last
one are generated; the frames between neighbouring keyframes come from a pluggable interpolator (config group
``interpolator``: anything with ``_target_`` that is called as ``interpolator(first, last, fractions)``); the
built-in default warps both keyframes along OpenCV Farneback optical flow and blends them.

Every output is written under a temporary name and renamed when complete, so a failure leaves no partial file.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from aniportrait.audio.io import SAMPLE_RATE, load_audio
from aniportrait.data.video import VideoWriter, probe_video
from aniportrait.errors import AniPortraitError
from aniportrait.face.drawing import draw_landmarks
from aniportrait.face.geometry import project_points, smooth_pose_sequence
from aniportrait.face.portrait import Portrait, load_portrait, portrait_from_landmarks_npz
from aniportrait.face.retarget import cycle_pose_template, load_pose_template
from aniportrait.utils.atomic import atomic_path

if TYPE_CHECKING:
    from aniportrait.api import AudioProcessor, MotionModel
    from aniportrait.pipelines.pose2video import Pose2VideoPipeline

__all__ = [
    "infer",
    "MODES",
    "AnimationOptions",
    "AnimationResult",
    "BatchJobResult",
    "Motion",
    "FrameInterpolator",
    "LinearInterpolator",
    "FlowInterpolator",
    "build_interpolator",
    "Portrait",
    "check_output_path",
    "load_reference",
    "resolve_device",
    "resolve_dtype",
    "motion_from_audio",
    "motion_from_video",
    "PoseFrames",
    "MeshPoseFrames",
    "LandmarkPoseFrames",
    "VideoPoseFrames",
    "pose_frames_from_file",
    "Sampling",
    "video_size",
    "generate_video",
    "write_landmark_outputs",
    "stitch_chunks",
    "fill_between_keyframes",
    "keyframe_indices",
    "chunk_spans",
    "read_manifest",
    "normalise_job",
    "batch_summary",
    "options_from_config",
]

log = logging.getLogger(__name__)

# -- inputs and outputs ------------------------------------------------------------------------------------------


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise AniPortraitError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    return torch.device(name)


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """Stage B's dtype; None (``auto``) lets the pipeline choose: bfloat16 on CUDA, float32 on CPU."""
    if name in (None, "auto"):
        dtype = None
    elif isinstance(name, torch.dtype):
        dtype = name
    elif str(name) in _DTYPES:
        dtype = _DTYPES[str(name)]
    else:
        raise AniPortraitError(f"dtype={name!r}: use auto, fp32, bf16 or fp16")
    if dtype == torch.float16 and device.type == "cpu":
        raise AniPortraitError("dtype=fp16 needs a GPU (CPU kernels lack half precision); use dtype=fp32 or bf16 on CPU")
    return dtype


def check_output_path(output: str | os.PathLike | None, suffix: str = ".mp4") -> Path:
    """The output file: its folder is created; an unwritable place is an error before any work."""
    if not output:
        raise AniPortraitError("no output given: add output=PATH.mp4")
    path = Path(os.path.expanduser(str(output)))
    if path.suffix.lower() != suffix:
        raise AniPortraitError(f"output={path} must end in {suffix}")
    if path.is_dir():
        raise AniPortraitError(f"output={path} is a folder; give a file name ending in {suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AniPortraitError(f"cannot create the output folder {path.parent} ({error.strerror}); choose output= elsewhere") from error
    try:  # a real write (permissions, read-only file systems, root squash), not just the mode bits
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as error:
        raise AniPortraitError(f"cannot write into {path.parent} ({error.strerror}); choose a writable output=") from error
    if path.exists() and not os.access(path, os.W_OK):
        raise AniPortraitError(f"cannot overwrite {path}: permission denied; choose a writable output=")
    return path


def load_reference(path: str | os.PathLike, frame: int = 0, size: int = 512, landmarker_model: str | None = None) -> Portrait:
    """A portrait from a clip's landmarks.npz (frame ``frame``) or from an image (landmarks extracted)."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise AniPortraitError(f"reference not found: {path}; give a portrait image or a clip's landmarks.npz (reference=...)")
    if path.suffix == ".npz":
        return portrait_from_landmarks_npz(path, frame=frame, size=size)
    return load_portrait(path, size=size, landmarker_model=landmarker_model)


@dataclass
class AnimationOptions:
    """Every knob of one generation; the infer.py keys of the same names. None: the bundle's setting."""

    width: int | None = None  # output size, multiples of 8; None: the bundle's (512 x 512 for the official release)
    height: int | None = None
    fps: float | None = None  # None: the driver's (the bundle's stage-A fps for speech, the video's own)
    length: int | None = None  # at most this many frames
    steps: int | None = None  # denoising steps
    guidance: float | None = None  # classifier-free guidance scale
    seed: int = 42
    context_frames: int | str | None = None  # frames the motion modules see at once ("auto": fewest windows) ...
    context_overlap: int | None = None  # ... and how many neighbouring windows share
    scheduler: Any = None  # None: the bundle's; a diffusers scheduler class name or {_target_: ..., **overrides}
    keyframe_interval: int = 1  # accelerated mode: generate every k-th frame, interpolate the rest
    interpolator: Any = None  # a FrameInterpolator or a {_target_: ...} config; None: FlowInterpolator
    chunk_frames: int = 120  # stage-B frames per pipeline call (keyframes in accelerated mode): bounds memory
    chunk_overlap: int = 8  # frames two neighbouring chunks share and cross-fade
    pose_source: str = "auto"  # audio: auto | predicted | still | template; video: auto | driver | still | template
    pose_template: str | None = None  # an official pose_temp.npy (N, 6)
    rotation_scale: float | None = None  # Audio2Pose rotations x this (None: the bundle's; 0.5 official)
    smooth_window: int | None = None  # pose smoothing window in frames (None: the bundle's)
    identity: int | str | None = None  # Audio2Pose identity index or training identity name
    reference_frame: int = 0  # the frame of a clip's landmarks.npz used as the portrait
    size: int = 512  # mode=landmarks: the pose video's side in pixels
    progress: bool = True  # progress bars and the one-line summary

    @classmethod
    def from_kwargs(cls, **options: Any) -> AnimationOptions:
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise AniPortraitError(f"unknown option(s) {', '.join(unknown)}; the options are: {', '.join(sorted(known))}")
        return cls(**options)


@dataclass(frozen=True)
class AnimationResult:
    """One written output."""

    output: Path
    frames: int
    fps: float
    seconds: float  # wall time of the whole call
    device: str

    @property
    def seconds_per_frame(self) -> float:
        return self.seconds / max(self.frames, 1)

    @property
    def summary(self) -> str:
        return (f"{self.output}: {self.frames} frames ({self.frames / self.fps:.2f} s at {self.fps:g} fps) in "
                f"{self.seconds:.1f} s, {self.seconds_per_frame:.3f} s/frame, {self.device}")


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


def _resampled_indices(source_frames: int, source_fps: float, fps: float | None, length: int | None) -> np.ndarray:
    """Source frame per output frame: the nearest earlier one at the output fps (identity without ``fps``)."""
    if not fps or abs(float(fps) - source_fps) < 1e-6:
        indices = np.arange(source_frames)
    else:
        count = math.ceil(source_frames * float(fps) / source_fps - 1e-9)
        indices = np.minimum(np.floor(np.arange(count) * source_fps / float(fps) + 1e-9).astype(np.int64), source_frames - 1)
    return indices[: int(length)] if length else indices


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
    indices = _resampled_indices(len(driving["mesh3d"]), source_fps, options.fps, options.length)
    driving = {key: value[indices] for key, value in driving.items()}
    result = retarget(portrait, driving, pose=modes[options.pose_source], pose_template=options.pose_template,
                      pose_smooth_window=int(options.smooth_window or 1))
    audio = load_audio(video) if info.has_audio else None
    return Motion(result.meshes, result.poses, float(options.fps or source_fps), audio)


# -- pose images, drawn chunk by chunk -----------------------------------------------------------------------------


class PoseFrames(Protocol):
    """A sequence of pose images rendered on demand (only a chunk at a time is ever in memory)."""

    size: tuple[int, int]  # (height, width)

    def __len__(self) -> int: ...

    def render(self, indices: np.ndarray) -> np.ndarray:
        """(n,) frame indices -> (n, H, W, 3) uint8 pose images."""
        ...


def _draw(normalized: np.ndarray, size: tuple[int, int]) -> np.ndarray:
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
        return _draw(self.normalized(indices), self.size)


class LandmarkPoseFrames:
    """2-D landmarks given as fractions of the image size (a landmarks .npz)."""

    def __init__(self, normalized: np.ndarray, size: tuple[int, int]):
        self.landmarks, self.size = normalized, size  # (T, N, 2)

    def __len__(self) -> int:
        return len(self.landmarks)

    def render(self, indices: np.ndarray) -> np.ndarray:
        return _draw(self.landmarks[indices], self.size)


class VideoPoseFrames:
    """Frames of a pose-image video, decoded at (H, W) when asked for."""

    def __init__(self, path: Path, indices: np.ndarray, size: tuple[int, int]):
        self.path, self.indices, self.size = path, indices, size

    def __len__(self) -> int:
        return len(self.indices)

    def render(self, indices: np.ndarray) -> np.ndarray:
        from aniportrait.data.video import read_video

        return read_video(self.path, self.indices[indices], size=self.size)


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
        indices = _resampled_indices(source_frames, info.fps, options.fps, options.length)
        audio = load_audio(path) if info.has_audio else None
        return VideoPoseFrames(path, indices, size), float(options.fps or info.fps), audio
    try:
        with np.load(path) as arrays:
            content = {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError) as error:
        raise AniPortraitError(f"cannot read {path} as a .npz file ({error})") from error
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
    indices = _resampled_indices(len(normalized), source_fps, options.fps, options.length)
    return LandmarkPoseFrames(normalized[indices], size), float(options.fps or source_fps), None


# -- accelerated mode: interpolating between generated keyframes ---------------------------------------------------


class FrameInterpolator(Protocol):
    """Frames between two generated keyframes (the ``interpolator`` config group's ``_target_``)."""

    def __call__(self, first: np.ndarray, last: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
        """first, last: (H, W, 3) uint8; fractions in (0, 1), the time of each wanted frame between them.
        Returns (len(fractions), H, W, 3) uint8."""
        ...


class LinearInterpolator:
    """Cross-fade: cheap and exact for static regions, ghosts where things move."""

    def __call__(self, first: np.ndarray, last: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
        weights = np.asarray(fractions, dtype=np.float32)[:, None, None, None]
        return np.round((1 - weights) * first[None] + weights * last[None]).astype(np.uint8)


class FlowInterpolator:
    """Warp both keyframes along dense optical flow (OpenCV Farneback) to time t and blend them.

    With the flows F01 (first -> last) and F10, pixel q at time t sits near ``q + t F10(q)`` in the first frame and
    ``q + (1 - t) F01(q)`` in the last (linear motion); each is sampled there and the two are mixed (1 - t) : t.
    """

    def __init__(self, levels: int = 4, window: int = 21, iterations: int = 3):
        self.levels, self.window, self.iterations = levels, window, iterations

    def _flow(self, source: np.ndarray, target: np.ndarray) -> np.ndarray:
        """(H, W, 2): where each pixel of ``source`` moved to in ``target``."""
        return cv2.calcOpticalFlowFarneback(cv2.cvtColor(source, cv2.COLOR_RGB2GRAY), cv2.cvtColor(target, cv2.COLOR_RGB2GRAY),
                                            None, 0.5, self.levels, self.window, self.iterations, 5, 1.2, 0)

    def __call__(self, first: np.ndarray, last: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
        forward, backward = self._flow(first, last), self._flow(last, first)
        height, width = first.shape[:2]
        grid = np.stack(np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)), axis=-1)
        frames = []
        for t in fractions:
            from_first = cv2.remap(first, (grid + t * backward).astype(np.float32), None, cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REPLICATE)
            from_last = cv2.remap(last, (grid + (1 - t) * forward).astype(np.float32), None, cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_REPLICATE)
            frames.append(np.round((1 - t) * from_first.astype(np.float32) + t * from_last.astype(np.float32)))
        return np.stack(frames).astype(np.uint8)


def build_interpolator(spec: Any) -> FrameInterpolator:
    """None -> :class:`FlowInterpolator`; a ``{_target_: ...}`` config -> instantiated; a callable -> itself."""
    if spec is None:
        return FlowInterpolator()
    if isinstance(spec, (Mapping, DictConfig)):
        import hydra

        if "_target_" not in spec:
            raise AniPortraitError(f"interpolator config {dict(spec)} has no _target_: name a class called as "
                                   "interpolator(first, last, fractions), e.g. aniportrait.inference.FlowInterpolator")
        spec = hydra.utils.instantiate(spec)
    if not callable(spec):
        raise AniPortraitError(f"interpolator {spec!r} is not callable as interpolator(first, last, fractions)")
    return spec


def keyframe_indices(num_frames: int, interval: int) -> np.ndarray:
    """Frames to generate: 0, k, 2k, ... and always the last one, so interpolation covers every frame."""
    if interval < 1:
        raise AniPortraitError(f"keyframe_interval={interval}: use 1 (every frame generated) or more")
    indices = np.arange(0, num_frames, interval)
    return indices if indices[-1] == num_frames - 1 else np.append(indices, num_frames - 1)


def fill_between_keyframes(keys: Sequence[int], keyframes: Iterable[np.ndarray],
                           interpolator: FrameInterpolator) -> Iterator[np.ndarray]:
    """Keyframes (in order, for frames ``keys``) -> every frame from keys[0] to keys[-1]."""
    previous_index, previous = None, None
    for index, frame in zip(keys, keyframes):
        if previous is not None and index - previous_index > 1:
            fractions = (np.arange(previous_index + 1, index) - previous_index) / (index - previous_index)
            yield from interpolator(previous, frame, fractions)
        yield frame
        previous_index, previous = int(index), frame


# -- stage B, streamed ---------------------------------------------------------------------------------------------


def chunk_spans(num_frames: int, chunk_frames: int, overlap: int) -> list[slice]:
    """Consecutive spans of at most ``chunk_frames`` covering ``range(num_frames)``, neighbours sharing exactly
    ``overlap`` frames (every span is longer than the overlap)."""
    if chunk_frames < 1 or not 0 <= overlap < chunk_frames:
        raise AniPortraitError(f"chunk_frames={chunk_frames}, chunk_overlap={overlap}: need chunk_frames >= 1 and "
                               "0 <= chunk_overlap < chunk_frames")
    if num_frames <= chunk_frames:
        return [slice(0, num_frames)]
    starts = range(0, num_frames - overlap, chunk_frames - overlap)
    return [slice(start, min(start + chunk_frames, num_frames)) for start in starts]


def stitch_chunks(chunks: Iterable[np.ndarray], overlap: int) -> Iterator[np.ndarray]:
    """Chunks of frames whose neighbours share ``overlap`` frames -> each frame once, the shared ones cross-faded
    (the later chunk's weight rising linearly through the overlap)."""
    tail: np.ndarray | None = None  # the last `overlap` frames of the previous chunk, held back
    for chunk in chunks:
        if tail is not None and len(tail):
            weights = (np.arange(1, len(tail) + 1, dtype=np.float32) / (len(tail) + 1))[:, None, None, None]
            chunk = chunk.copy()
            chunk[: len(tail)] = np.round((1 - weights) * tail + weights * chunk[: len(tail)]).astype(np.uint8)
        keep = len(chunk) - overlap
        yield from chunk[:keep]
        tail = chunk[keep:]
    if tail is not None:
        yield from tail


@dataclass(frozen=True)
class Sampling:
    """Stage-B settings of one video: options resolved against the bundle's settings."""

    width: int
    height: int
    steps: int
    guidance: float
    context_frames: int | str
    context_overlap: int
    seed: int

    @classmethod
    def resolve(cls, options: AnimationOptions, settings: Mapping[str, Any]) -> Sampling:
        def pick(value: Any, key: str, default: Any) -> Any:
            return value if value is not None else settings.get(key) or default

        return cls(int(pick(options.width, "width", 512)), int(pick(options.height, "height", 512)),
                   int(pick(options.steps, "num_inference_steps", 25)), float(pick(options.guidance, "guidance_scale", 3.5)),
                   _context_frames(pick(options.context_frames, "context_frames", 16)),
                   int(pick(options.context_overlap, "context_overlap", 4)), int(options.seed))


def _context_frames(value: Any) -> int | str:
    if value == "auto":
        return "auto"
    try:
        return int(value)
    except (TypeError, ValueError):
        raise AniPortraitError(f"context_frames={value!r}: give a frame count (16 official) or auto") from None


def build_sampling_scheduler(choice: Any, base: Any) -> Any:
    """``scheduler=``: another diffusers scheduler for sampling, built with ``from_config`` on the bundle's
    scheduler config (so v-prediction, zero-terminal-SNR betas and timestep spacing carry over) plus overrides.
    ``choice``: a class name of diffusers ("DPMSolverMultistepScheduler") or {_target_: diffusers.X, **overrides}."""
    import diffusers

    if isinstance(choice, str):
        choice = {"_target_": choice}
    if not isinstance(choice, Mapping) or not choice.get("_target_"):
        raise AniPortraitError(f"scheduler={choice!r}: give a diffusers scheduler class, e.g. "
                               "scheduler=DPMSolverMultistepScheduler or '{_target_: diffusers.UniPCMultistepScheduler}'")
    overrides = dict(choice)
    name = str(overrides.pop("_target_")).removeprefix("diffusers.").removeprefix("schedulers.")
    cls = getattr(diffusers, name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise AniPortraitError(f"scheduler: {name!r} is not a diffusers scheduler (e.g. DDIMScheduler, "
                               "DPMSolverMultistepScheduler, UniPCMultistepScheduler, EulerDiscreteScheduler)")
    if name == "DPMSolverMultistepScheduler":  # zero terminal SNR: the last step must land on sigma 0
        overrides.setdefault("final_sigmas_type", "zero")
    return cls.from_config(base.config, **overrides)


def video_size(options: AnimationOptions, settings: Mapping[str, Any]) -> tuple[int, int]:
    """(height, width) of the output, checked: multiples of 8 (the VAE's downsampling)."""
    sampling = Sampling.resolve(options, settings)
    if sampling.width % 8 or sampling.height % 8 or min(sampling.width, sampling.height) < 8:
        raise AniPortraitError(f"output size {sampling.width} x {sampling.height}: width and height must be positive "
                               "multiples of 8 (e.g. width=512 height=512)")
    return sampling.height, sampling.width


def generate_video(pipeline: Pose2VideoPipeline, portrait: Portrait, pose_frames: PoseFrames, output: Path, fps: float,
                   audio: np.ndarray | None, options: AnimationOptions) -> int:
    """Sample the video chunk by chunk (keyframes only in accelerated mode) and write every frame to ``output`` with
    ``audio`` muxed (atomically); returns the frame count."""
    sampling = Sampling.resolve(options, pipeline.video_settings)
    total = len(pose_frames)
    keys = keyframe_indices(total, int(options.keyframe_interval))
    spans = chunk_spans(len(keys), int(options.chunk_frames), int(options.chunk_overlap))
    interpolator = build_interpolator(options.interpolator) if options.keyframe_interval > 1 else None
    reference_pose = _draw(portrait.lmks[None, :468, :2], pose_frames.size)[0]  # the portrait's own landmarks
    generator = torch.Generator("cpu").manual_seed(sampling.seed)  # the same noise on CPU and GPU
    if options.scheduler is not None:
        scheduler = build_sampling_scheduler(options.scheduler, pipeline.scheduler)
        default_scheduler, pipeline.scheduler = pipeline.scheduler, scheduler
        try:
            return generate_video(pipeline, portrait, pose_frames, output, fps, audio,
                                  dataclasses.replace(options, scheduler=None))
        finally:
            pipeline.scheduler = default_scheduler

    def chunks() -> Iterator[np.ndarray]:
        for span in spans:
            yield pipeline(portrait.image, pose_frames.render(keys[span]), reference_pose,
                           num_inference_steps=sampling.steps, guidance_scale=sampling.guidance,
                           context_frames=sampling.context_frames, context_overlap=sampling.context_overlap,
                           generator=generator, progress=options.progress, width=sampling.width, height=sampling.height)

    keyframes = stitch_chunks(chunks(), int(options.chunk_overlap))
    frames = fill_between_keyframes(keys, keyframes, interpolator) if interpolator else keyframes
    with VideoWriter(output, fps) as writer, tqdm(total=total, desc="frames", unit="frame",
                                                  disable=not options.progress) as bar:
        writer.set_audio(_audio_for(audio, total, fps))
        for frame in frames:
            writer.write(frame)
            bar.update(1)
    return writer.frames_written


def write_landmark_outputs(output: Path, pose_frames: MeshPoseFrames, motion: Motion, portrait: Portrait,
                           progress: bool = True, chunk_frames: int = 256) -> int:
    """mode=landmarks: the pose-image video (audio muxed) and ``<output>.npz`` (meshes, poses, 2-D landmarks in
    pixels, trans_mat, image_size, fps), both written atomically; pose images are drawn chunk by chunk."""
    total = len(pose_frames)
    height, width = pose_frames.size
    pixels = np.empty((total, 468, 2), dtype=np.float32)
    with atomic_path(output.with_suffix(".npz")) as arrays_tmp, VideoWriter(output, motion.fps) as writer:
        writer.set_audio(_audio_for(motion.audio, total, motion.fps))
        for span in tqdm(chunk_spans(total, chunk_frames, 0), desc="pose images", disable=not progress):
            indices = np.arange(span.start, span.stop)
            normalized = pose_frames.normalized(indices)  # (n, 468, 2)
            pixels[span] = normalized * np.array([width, height])
            writer.write(_draw(normalized, pose_frames.size))
        with open(arrays_tmp, "wb") as handle:
            np.savez_compressed(handle, meshes=np.asarray(motion.meshes, np.float32), poses=motion.poses.astype(np.float32),
                                landmarks=pixels, trans_mat=portrait.trans_mat.astype(np.float32),
                                image_size=np.array([height, width]), fps=np.float32(motion.fps))
    return total


def _audio_for(audio: np.ndarray | None, frames: int, fps: float) -> np.ndarray | None:
    """The audio to mux: exactly as long as the frames."""
    return None if audio is None else audio[: round(frames / fps * SAMPLE_RATE)]


# -- batch ---------------------------------------------------------------------------------------------------------

# manifest column / job key -> the AniPortrait method argument it names
_JOB_ALIASES = {"image": "image_path", "reference": "image_path", "audio": "audio_path", "video": "video_path",
                "landmarks": "landmarks_path", "pose": "landmarks_path", "output": "output_path"}
_JOB_PATHS = ("image_path", "audio_path", "video_path", "landmarks_path", "output_path", "pose_template")
JOB_MODES = ("audio", "video", "pose", "landmarks")


@dataclass(frozen=True)
class BatchJobResult:
    """One job of a batch: ``status`` is done, skipped (its output existed) or failed (``error`` says why)."""

    index: int
    output: Path | None
    status: str
    error: str | None = None
    result: AnimationResult | None = None


def _scalar(value: Any) -> Any:
    """Manifest cells are text: "" -> None, "25" -> 25, "true" -> True; other text stays text."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    parsed = yaml.safe_load(value)
    return parsed if isinstance(parsed, (int, float, bool)) or parsed is None else value


def normalise_job(job: Mapping[str, Any], base_dir: Path | None = None) -> dict[str, Any]:
    """A job as method arguments: aliases mapped (``image`` -> ``image_path``, ...), text cells parsed, relative
    paths taken from ``base_dir``, ``mode`` inferred from the driver given (audio, video or pose)."""
    option_names = {field.name for field in fields(AnimationOptions)}
    known = option_names | set(_JOB_PATHS) | {"mode"}
    normalised: dict[str, Any] = {}
    for key, value in job.items():
        key = _JOB_ALIASES.get(str(key).strip(), str(key).strip())
        if key not in known:
            raise AniPortraitError(f"unknown job field {key!r}; use image, audio | video | landmarks, output, mode and "
                                   f"options ({', '.join(sorted(option_names))})")
        value = _scalar(value)
        if value is None:
            continue
        if key in _JOB_PATHS:
            path = Path(os.path.expanduser(str(value)))
            value = path if path.is_absolute() or base_dir is None else base_dir / path
        normalised[key] = value
    drivers = [key for key in ("audio_path", "video_path", "landmarks_path") if key in normalised]
    mode = normalised.setdefault("mode", {"audio_path": "audio", "video_path": "video",
                                          "landmarks_path": "pose"}.get(drivers[0]) if len(drivers) == 1 else None)
    if mode not in JOB_MODES:
        raise AniPortraitError(f"job mode {mode!r} unclear: give exactly one of audio, video, landmarks, or mode= one "
                               f"of {', '.join(JOB_MODES)}")
    for required in ("image_path", "output_path"):
        if required not in normalised:
            raise AniPortraitError(f"job lacks {required.removesuffix('_path')} (the {required} argument)")
    return normalised


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Jobs of a batch: a CSV with a header row or JSON lines, one job per row; relative paths are relative to the
    manifest's folder. Every row is checked before anything runs."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise AniPortraitError(f"batch manifest not found: {path}; give a .csv or .jsonl file (manifest=PATH)")
    rows: list[tuple[int, Mapping[str, Any]]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise AniPortraitError(f"{path} line {number}: not JSON ({error.msg})") from error
                if not isinstance(row, dict):
                    raise AniPortraitError(f"{path} line {number}: expected a JSON object per line")
                rows.append((number, row))
    elif path.suffix.lower() == ".csv":
        with open(path, newline="") as handle:
            rows = [(number, row) for number, row in enumerate(csv.DictReader(handle), 2)]
    else:
        raise AniPortraitError(f"batch manifest {path} must be .csv (with a header row) or .jsonl")
    jobs = []
    for number, row in rows:
        try:
            jobs.append(normalise_job(row, path.parent))
        except AniPortraitError as error:
            raise AniPortraitError(f"{path} line {number}: {error}") from error
    if not jobs:
        raise AniPortraitError(f"batch manifest {path} holds no jobs")
    return jobs


def batch_summary(results: Sequence[BatchJobResult]) -> str:
    counts = {status: sum(result.status == status for result in results) for status in ("done", "skipped", "failed")}
    lines = [f"batch: {len(results)} jobs: {counts['done']} done, {counts['skipped']} skipped (finished before), "
             f"{counts['failed']} failed"]
    lines += [f"  job {result.index}: {result.output}: {result.error}" for result in results if result.status == "failed"]
    return "\n".join(lines)


# -- infer.py ------------------------------------------------------------------------------------------------------


def options_from_config(cfg: DictConfig) -> dict[str, Any]:
    """infer.py keys -> AnimationOptions fields (``pose.*`` and ``stream.*`` flattened)."""
    pose = cfg.get("pose") or {}
    stream = cfg.get("stream") or {}
    interpolator = cfg.get("interpolator")
    return {
        "width": cfg.get("width"), "height": cfg.get("height"), "fps": cfg.get("fps"), "length": cfg.get("length"),
        "steps": cfg.get("steps"), "guidance": cfg.get("guidance"), "seed": int(cfg.get("seed", 42)),
        "context_frames": cfg.get("context_frames"), "context_overlap": cfg.get("context_overlap"),
        "scheduler": OmegaConf.to_container(cfg.scheduler) if isinstance(cfg.get("scheduler"), DictConfig)
        else cfg.get("scheduler"),
        "keyframe_interval": int(cfg.get("keyframe_interval") or 1),
        "interpolator": OmegaConf.to_container(interpolator) if isinstance(interpolator, DictConfig) else interpolator,
        "chunk_frames": int(stream.get("chunk_frames", 120)), "chunk_overlap": int(stream.get("chunk_overlap", 8)),
        "pose_source": pose.get("source", "auto"), "pose_template": pose.get("template"),
        "rotation_scale": pose.get("rotation_scale"), "smooth_window": pose.get("smooth_window"),
        "identity": cfg.get("identity"), "reference_frame": int(cfg.get("reference_frame", 0)),
        "size": int(cfg.get("size", 512)), "progress": bool(cfg.get("progress", True)),
    }


def _need(cfg: DictConfig, key: str, message: str) -> Any:
    if not cfg.get(key):
        raise AniPortraitError(message)
    return cfg[key]


def _portrait(cfg: DictConfig) -> Any:
    return _need(cfg, "reference", f"mode={cfg.mode} needs a portrait: add reference=PATH (an image or a clip's "
                                   "landmarks.npz)")


def _infer_audio(ap, cfg: DictConfig, options: dict[str, Any]) -> AnimationResult:
    audio = _need(cfg, "audio", "mode=audio needs speech: add audio=PATH (wav, flac, mp3, m4a)")
    return ap.animate(image_path=_portrait(cfg), audio_path=audio, output_path=cfg.output, **options)


def _infer_video(ap, cfg: DictConfig, options: dict[str, Any]) -> AnimationResult:
    video = _need(cfg, "video", "mode=video needs a driving video: add video=PATH.mp4")
    return ap.animate_from_video(image_path=_portrait(cfg), video_path=video, output_path=cfg.output, **options)


def _infer_pose(ap, cfg: DictConfig, options: dict[str, Any]) -> AnimationResult:
    if bool(cfg.get("video")) == bool(cfg.get("landmarks")):
        raise AniPortraitError("mode=pose needs exactly one pose input: video=POSE_IMAGES.mp4 or landmarks=POSES.npz")
    return ap.animate_from_landmarks(image_path=_portrait(cfg), landmarks_path=cfg.get("video") or cfg.landmarks,
                                     output_path=cfg.output, audio_path=cfg.get("audio"), **options)


def _infer_landmarks(ap, cfg: DictConfig, options: dict[str, Any]) -> AnimationResult:
    if bool(cfg.get("audio")) == bool(cfg.get("video")):
        raise AniPortraitError("mode=landmarks needs exactly one driver: audio=SPEECH (wav, flac, mp3, m4a) or "
                               "video=DRIVING.mp4")
    return ap.landmarks(image_path=_portrait(cfg), output_path=cfg.output, audio_path=cfg.get("audio"),
                        video_path=cfg.get("video"), **options)


def _infer_batch(ap, cfg: DictConfig, options: dict[str, Any]) -> list[BatchJobResult]:
    jobs = read_manifest(_need(cfg, "manifest", "mode=batch needs a job list: add manifest=JOBS.csv or JOBS.jsonl"))
    results = ap.animate_batch(jobs, skip_existing=bool(cfg.get("skip_existing", True)), **options)
    failed = [result for result in results if result.status == "failed"]
    if failed:
        raise AniPortraitError(f"{len(failed)} of {len(results)} batch jobs failed (listed above); fix them and rerun: "
                               "finished outputs are skipped")
    return results


MODES: dict[str, Callable[..., Any]] = {"audio": _infer_audio, "video": _infer_video, "pose": _infer_pose,
                                        "landmarks": _infer_landmarks, "batch": _infer_batch}


def infer(cfg: DictConfig):
    """``python infer.py mode=...``: the AniPortrait method of the mode, with the config's options."""
    from aniportrait.api import AniPortrait

    mode = cfg.get("mode")
    if mode not in MODES:
        raise AniPortraitError(f"unknown mode={mode!r}; choose one of {', '.join(MODES)}")
    if mode != "batch":
        check_output_path(cfg.get("output"))  # before any model loads
    ap = AniPortrait(bundle=cfg.get("bundle"), device=cfg.get("device"), dtype=cfg.get("dtype"),
                     landmarker_model=(cfg.get("face") or {}).get("landmarker_model"), compile=bool(cfg.get("compile")))
    return MODES[mode](ap, cfg, options_from_config(cfg))
