"""What one generation is asked for: devices and precision, the output path, the portrait, and every option of
:class:`AnimationOptions` resolved against the bundle's settings (:class:`Sampling`)."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aniportrait.data.portrait import portrait_from_landmarks_npz
from aniportrait.errors import AniPortraitError
from aniportrait.face.portrait import Portrait, load_portrait
from aniportrait.pipelines.presets import SAMPLING_PRESETS
from aniportrait.utils import values
from aniportrait.utils.outputs import Overwrite, check_outputs

__all__ = ["AnimationOptions", "AnimationResult", "Sampling", "resolve_device", "resolve_dtype", "check_output_path",
           "check_collisions", "load_reference", "video_size", "resampled_indices", "POSE_SOURCES"]

POSE_SOURCES = ("auto", "predicted", "driver", "still", "template")


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise AniPortraitError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    try:
        return torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise AniPortraitError(f"device={name!r}: use auto, cpu, cuda or cuda:N ({error})") from error


PROJECT_CHUNK_FRAMES = 120  # the project preset's frames per pipeline call (stream.chunk_frames)

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """Stage B's dtype; None (``auto``) lets the pipeline choose: on CUDA float16 for the official sampling preset
    (as the official scripts) and bfloat16 otherwise, float32 on CPU."""
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


def check_collisions(outputs: Mapping[str, str | os.PathLike | None], inputs: Mapping[str, Any],
                     options: AnimationOptions) -> None:
    """Before any model loads: no output is an input (``output=`` the ``video=``, mode=landmarks' .npz the
    ``reference=`` landmarks.npz) or another output, and none exists unless ``overwrite=true``."""
    paths = {key: value for key, value in inputs.items() if isinstance(value, (str, os.PathLike))}
    check_outputs(outputs, paths, Overwrite(options.overwrite, "overwrite=true"))


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
    window_batch: int = 1  # context windows denoised together in one UNet call (same frames up to float rounding)
    decode_batch: int | None = None  # frames per VAE decoder call (same frames); None: DECODE_BATCH_SIZE (2)
    encoder_threads: int | None = None  # x264 threads writing the video; None: one per core, at most 16 (the
    # bitstream, not the picture, depends on the count)
    deep_cache_interval: int | None = None  # N > 1: the whole UNet every N-th step, its top level between (DeepCache;
    # other frames); 1: every step; None: the bundle's, else the sampling preset's (project 2, official 1)
    scheduler: Any = None  # None: the bundle's; a diffusers scheduler class name or {_target_: ..., **overrides}
    sampling: str | None = None  # sampling preset: official | project; None: the bundle's (official when imported)
    keyframe_interval: int = 1  # accelerated mode: generate every k-th frame, interpolate the rest
    interpolator: Any = None  # a FrameInterpolator or a {_target_: ...} config; None: FlowInterpolator
    chunk_frames: int | None = None  # stage-B frames per pipeline call (keyframes in accelerated mode), bounding
    # memory; None: the preset's: the whole video in one sequence of context windows (official), 120 (project)
    chunk_overlap: int = 8  # frames two neighbouring chunks share and cross-fade
    first_chunk_frames: int | None = None  # the first chunk's frames (streaming: a short one, a sooner first frame)
    pose_source: str = "auto"  # audio: auto | predicted | still | template; video: auto | driver | still | template
    pose_template: str | None = None  # an official pose_temp.npy (N, 6)
    rotation_scale: float | None = None  # Audio2Pose rotations x this (None: the bundle's; 0.5 official)
    smooth_window: int | None = None  # pose smoothing window in frames (None: the bundle's)
    identity: int | str | None = None  # Audio2Pose identity index or training identity name
    reference_frame: int = 0  # the frame of a clip's landmarks.npz used as the portrait
    size: int = 512  # mode=landmarks: the pose video's side in pixels
    progress: bool = True  # progress bars and the one-line summary
    overwrite: bool = False  # replace an output file that exists (never an input); else that is refused

    def __post_init__(self) -> None:
        """Every value checked (and typed) where it enters: the API, infer.py and each batch row build this."""
        def optional(key: str, check, *args, **kwargs) -> None:
            if getattr(self, key) is not None:
                setattr(self, key, check(key, getattr(self, key), *args, **kwargs))

        for key in ("width", "height"):
            optional(key, values.integer, minimum=8, hint=" (a multiple of 8), or null: the bundle's")
            if getattr(self, key) is not None and getattr(self, key) % 8:
                raise AniPortraitError(f"{key}={getattr(self, key)}: give a multiple of 8 (the VAE's downsampling), "
                                       "e.g. 512")
        optional("fps", values.number, minimum=0, maximum=240, exclusive_minimum=True, hint=" (or null: the driver's)")
        optional("length", values.integer, minimum=1, hint=" frames (or null: all)")
        optional("steps", values.integer, minimum=1, maximum=1000, hint=" denoising steps (or null: the bundle's)")
        optional("guidance", values.number, minimum=0, maximum=100, hint=" (1: no guidance; 3.5 official)")
        self.seed = values.integer("seed", self.seed, minimum=0, maximum=2**63 - 1)
        if self.context_frames is not None and self.context_frames != "auto":
            self.context_frames = values.integer("context_frames", self.context_frames, minimum=1, hint=" or auto")
        optional("context_overlap", values.integer, minimum=0)
        self.window_batch = values.integer("window_batch", self.window_batch, minimum=1)
        optional("decode_batch", values.integer, minimum=1, hint=" frames per VAE call (or null: 2)")
        optional("encoder_threads", values.integer, minimum=1, maximum=64,
                 hint=" x264 threads (or null: one per core, at most 16)")
        optional("deep_cache_interval", values.integer, minimum=1,
                 hint=" (1: the whole UNet at every step; or null: the sampling preset's)")
        if isinstance(self.context_frames, int) and self.context_overlap is not None \
                and self.context_overlap >= self.context_frames:
            raise AniPortraitError(f"context_overlap={self.context_overlap}: give fewer frames than "
                                   f"context_frames={self.context_frames}")
        if self.sampling is not None:
            self.sampling = values.choice("sampling", self.sampling, SAMPLING_PRESETS)
        self.keyframe_interval = values.integer("keyframe_interval", self.keyframe_interval, minimum=1)
        optional("chunk_frames", values.integer, minimum=1, hint=" (or null: the sampling preset's)")
        self.chunk_overlap = values.integer("chunk_overlap", self.chunk_overlap, minimum=0)
        if self.chunk_frames is not None and self.chunk_overlap >= self.chunk_frames:
            raise AniPortraitError(f"chunk_overlap={self.chunk_overlap}: give fewer frames than "
                                   f"chunk_frames={self.chunk_frames}")
        optional("first_chunk_frames", values.integer, minimum=1, hint=" (or null: chunk_frames)")
        if self.first_chunk_frames is not None and self.chunk_overlap >= self.first_chunk_frames:
            raise AniPortraitError(f"first_chunk_frames={self.first_chunk_frames}: give more frames than "
                                   f"chunk_overlap={self.chunk_overlap}")
        self.pose_source = values.choice("pose_source", self.pose_source, POSE_SOURCES)
        optional("rotation_scale", values.number, minimum=0, hint=" (0.5 official)")
        optional("smooth_window", values.integer, minimum=1, hint=" frames (1: no smoothing)")
        if self.identity is not None and not (isinstance(self.identity, str) and not self.identity.strip().isdigit()):
            self.identity = values.integer("identity", self.identity, minimum=0, hint=", or a training identity name")
        self.reference_frame = values.integer("reference_frame", self.reference_frame, minimum=0)
        self.size = values.integer("size", self.size, minimum=16, maximum=4096)
        if self.size % 2:
            raise AniPortraitError(f"size={self.size}: give an even number of pixels (H.264), e.g. 512")
        self.progress = values.boolean("progress", self.progress)
        self.overwrite = values.boolean("overwrite", self.overwrite)

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
    preset: str  # official | project (aniportrait.pipelines.presets)
    chunk_frames: int | None  # frames per pipeline call; None: the whole video in one
    deep_cache_interval: int  # the whole UNet every N-th step (1: every step)

    @classmethod
    def resolve(cls, options: AnimationOptions, settings: Mapping[str, Any]) -> Sampling:
        def pick(value: Any, key: str, default: Any) -> Any:
            return value if value is not None else settings.get(key) or default

        preset = str(pick(options.sampling, "sampling", "project"))
        if preset not in SAMPLING_PRESETS:
            raise AniPortraitError(f"sampling={preset!r}: choose one of {', '.join(SAMPLING_PRESETS)} (official: the "
                                   "official pipeline's frames; project: windows blended with ramps)")
        chunk_frames = options.chunk_frames if options.chunk_frames is not None else (
            None if preset == "official" else PROJECT_CHUNK_FRAMES)
        return cls(int(pick(options.width, "width", 512)), int(pick(options.height, "height", 512)),
                   int(pick(options.steps, "num_inference_steps", 25)), float(pick(options.guidance, "guidance_scale", 3.5)),
                   parse_context_frames(options.context_frames) if options.context_frames is not None
                   else bundle_context_frames(settings, preset),
                   int(pick(options.context_overlap, "context_overlap", 4)), int(options.seed), preset,
                   None if chunk_frames is None else int(chunk_frames),
                   int(pick(options.deep_cache_interval, "deep_cache_interval",
                            SAMPLING_PRESETS[preset].deep_cache_interval)))


def bundle_context_frames(settings: Mapping[str, Any], preset: str) -> int | str:
    """The context window a bundle samples with when nothing else is asked (16 where it names none). A bundle's
    ``auto`` (stage configs since 2026-12-03) belongs to the blended schedule; under the ``official`` preset, whose
    uniform schedule has fixed windows, it is the official 16."""
    value = parse_context_frames(settings.get("context_frames") or 16, "settings.video.context_frames")
    return 16 if value == "auto" and preset == "official" else value


def parse_context_frames(value: Any, key: str = "context_frames") -> int | str:
    """A context window setting: a frame count, or auto (the fewest windows); ``key`` names it in the error."""
    if value == "auto":
        return "auto"
    try:
        return int(value)
    except (TypeError, ValueError):
        raise AniPortraitError(f"{key}={value!r}: give a frame count (16 official) or auto") from None


def video_size(options: AnimationOptions, settings: Mapping[str, Any]) -> tuple[int, int]:
    """(height, width) of the output, checked: multiples of 8 (the VAE's downsampling)."""
    sampling = Sampling.resolve(options, settings)
    if sampling.width % 8 or sampling.height % 8 or min(sampling.width, sampling.height) < 8:
        raise AniPortraitError(f"output size {sampling.width} x {sampling.height}: width and height must be positive "
                               "multiples of 8 (e.g. width=512 height=512)")
    return sampling.height, sampling.width


def resampled_indices(source_frames: int, source_fps: float, fps: float | None, length: int | None) -> np.ndarray:
    """Source frame per output frame: the nearest earlier one at the output fps (identity without ``fps``)."""
    if not fps or abs(float(fps) - source_fps) < 1e-6:
        indices = np.arange(source_frames)
    else:
        count = math.ceil(source_frames * float(fps) / source_fps - 1e-9)
        indices = np.minimum(np.floor(np.arange(count) * source_fps / float(fps) + 1e-9).astype(np.int64), source_frames - 1)
    return indices[: int(length)] if length else indices
