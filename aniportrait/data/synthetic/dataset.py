"""The synthetic dataset: its spec, one clip's generation with exact ground truth, and the cached,
resumable dataset folder in the clip format (GUIDE section 3)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from aniportrait.audio.io import frame_count, write_wav
from aniportrait.data.clip import MANIFEST_NAME, ClipRecord, Manifest, clip_dir, save_landmarks
from aniportrait.data.synthetic.expression import build_rig, express
from aniportrait.data.synthetic.identity import make_identity
from aniportrait.data.synthetic.motion import blink_track, camera_placement, head_motion
from aniportrait.data.synthetic.render import FaceRenderer
from aniportrait.data.synthetic.speech import MouthControls, mouth_controls, plan_utterance, synthesize_speech
from aniportrait.data.video import write_video
from aniportrait.errors import AniPortraitError
from aniportrait.face.geometry import DEFAULT_CAMERA, matrix_to_pose6, pose6_to_matrix, project_points
from aniportrait.face.topology import (
    BLENDSHAPE_INDEX,
    LOWER_INNER_LIP_CENTRE,
    NUM_MESH_VERTICES,
    UPPER_INNER_LIP_CENTRE,
)
from aniportrait.utils.atomic import atomic_path

__all__ = [
    "SyntheticSpec",
    "SyntheticClip",
    "dataset_dir",
    "ensure_synthetic_dataset",
    "generate_clip",
    "write_clip",
    "clip_record",
]

# Bump whenever the generator's output changes: the dataset folder name changes with it, so stale
# caches are never mistaken for current ones.
GENERATOR_VERSION = 1
CLIP_FILES = ("audio.wav", "video.mp4", "landmarks.npz")  # written in this order; landmarks last
VIDEO_CRF, VIDEO_PRESET = 18, "medium"
FACE_FRACTION = (0.55, 0.65)  # chin-to-forehead height as a fraction of the frame
# Independent random streams per clip, so that changing one part of the generator leaves the others.
LENGTH_STREAM, SPEECH_STREAM, AUDIO_STREAM, BLINK_STREAM, MOTION_STREAM, CAMERA_STREAM = 2, 3, 4, 5, 6, 7


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. Every field takes part in the dataset folder's name (``dataset_dir``)."""

    seed: int = 0
    identities: int = 6
    clips_per_identity: int = 8  # per identity the last two clips go to val and test when there are >= 3
    clip_seconds: float = 4.0  # each clip's length varies deterministically in [0.75x, 1.25x]
    fps: int = 30
    size: int = 256  # square frames
    sample_rate: int = 16000

    def __post_init__(self) -> None:
        # Hydra hands over ints for floats and vice versa; normalise so equal specs hash equally.
        for spec_field in fields(self):
            value = getattr(self, spec_field.name)
            if spec_field.type == "int":
                if isinstance(value, bool) or float(value) != int(value):
                    raise AniPortraitError(f"synthetic data: {spec_field.name}={value!r} must be an integer")
                value = int(value)
            else:
                value = float(value)
            object.__setattr__(self, spec_field.name, value)
        problems = [
            (self.seed < 0, "seed must be >= 0"),
            (self.identities < 1, "identities must be >= 1"),
            (self.clips_per_identity < 1, "clips_per_identity must be >= 1"),
            (self.clip_seconds <= 0, "clip_seconds must be > 0"),
            (self.fps < 1, "fps must be >= 1"),
            (self.size < 16 or self.size % 2, "size must be even and >= 16 (H.264 needs even sizes)"),
            (self.sample_rate < 8000, "sample_rate must be >= 8000 Hz (the clip format uses 16000)"),
        ]
        for failed, message in problems:
            if failed:
                raise AniPortraitError(f"synthetic data: {message}; got {asdict(self)}")


@dataclass(frozen=True)
class SyntheticClip:
    """One generated clip, ready to be written in the clip format."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    audio: np.ndarray  # (N,) float32 mono at ``sample_rate``; N / sample_rate is within a frame of T / fps
    landmarks: dict[str, np.ndarray]  # the clip format's arrays + extras (see the package docstring)
    fps: int
    sample_rate: int


def dataset_dir(root: str | os.PathLike, spec: SyntheticSpec) -> Path:
    """``root / synthetic-<hash>``: the hash covers the spec and the generator version."""
    key = json.dumps({"generator_version": GENERATOR_VERSION, **asdict(spec)}, sort_keys=True)
    return Path(root) / f"synthetic-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def clip_id(identity: int, clip: int) -> str:
    return f"id{identity:02d}_clip{clip:02d}"


def _rng(spec: SyntheticSpec, identity: int, clip: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, identity, clip, stream])


def clip_num_samples(spec: SyntheticSpec, identity: int, clip: int) -> int:
    """Audio length of a clip; cheap, so manifests can be written without generating clips."""
    factor = _rng(spec, identity, clip, LENGTH_STREAM).uniform(0.75, 1.25)
    return max(int(round(spec.clip_seconds * factor * spec.sample_rate)), 1)


def clip_split(spec: SyntheticSpec, clip: int) -> str:
    if spec.clips_per_identity >= 3 and clip >= spec.clips_per_identity - 2:
        return "val" if clip == spec.clips_per_identity - 2 else "test"
    return "train"


def clip_record(spec: SyntheticSpec, identity: int, clip: int) -> ClipRecord:
    """The manifest line of a clip (paths relative to the dataset folder)."""
    name = clip_id(identity, clip)
    num_samples = clip_num_samples(spec, identity, clip)
    return ClipRecord(
        id=name,
        split=clip_split(spec, clip),
        identity=f"synthetic_{identity:02d}",
        fps=spec.fps,
        frames=frame_count(num_samples, spec.fps, spec.sample_rate),
        width=spec.size,
        height=spec.size,
        duration_s=num_samples / spec.sample_rate,
        source="synthetic",
        video=f"clips/{name}/video.mp4",
        audio=f"clips/{name}/audio.wav",
        landmarks=f"clips/{name}/landmarks.npz",
    )


def _landmarks(mesh3d: np.ndarray, iris_points: np.ndarray, trans_mat: np.ndarray, size: int) -> np.ndarray:
    """(T, 478, 3) normalised landmarks: projected x, y over the frame size; z = camera depth minus the
    mean depth of the 468 mesh vertices, divided by the frame's visible width at that mean depth."""
    frames = len(mesh3d)
    points = np.concatenate([mesh3d, np.broadcast_to(iris_points, (frames, *iris_points.shape))], axis=1)
    points = points.astype(np.float64)
    trans = trans_mat.astype(np.float64)
    xy = project_points(points, trans, image_size=(size, size)) / size  # (T, 478, 2)
    depth = -(points @ np.swapaxes(trans[:, :3, :3], 1, 2) + trans[:, None, :3, 3])[..., 2]  # camera looks down -z
    mean_depth = depth[:, :NUM_MESH_VERTICES].mean(axis=1, keepdims=True)  # (T, 1)
    visible_width = 2.0 * mean_depth * np.tan(np.deg2rad(DEFAULT_CAMERA.vertical_fov_degrees) / 2.0)
    z = (depth - mean_depth) / visible_width
    return np.concatenate([xy, z[..., None]], axis=-1).astype(np.float32)


def _blendshapes(controls: MouthControls, blink: np.ndarray) -> np.ndarray:
    """(T, 52) MediaPipe-named scores from the ground-truth controls (package docstring); others 0."""
    scores = np.zeros((len(controls.jaw_open), len(BLENDSHAPE_INDEX)))
    scores[:, BLENDSHAPE_INDEX["jawOpen"]] = controls.jaw_open
    scores[:, BLENDSHAPE_INDEX["mouthPucker"]] = controls.pucker
    scores[:, BLENDSHAPE_INDEX["mouthFunnel"]] = controls.pucker * controls.jaw_open
    scores[:, BLENDSHAPE_INDEX["mouthStretchLeft"]] = controls.spread
    scores[:, BLENDSHAPE_INDEX["mouthStretchRight"]] = controls.spread
    scores[:, BLENDSHAPE_INDEX["eyeBlinkLeft"]] = blink[:, 0]
    scores[:, BLENDSHAPE_INDEX["eyeBlinkRight"]] = blink[:, 1]
    return scores.astype(np.float32)  # _neutral stays 0, as MediaPipe reports it (~1e-6) on real faces


def _check_indices(spec: SyntheticSpec, identity: int, clip: int) -> None:
    if not (0 <= identity < spec.identities and 0 <= clip < spec.clips_per_identity):
        raise AniPortraitError(
            f"synthetic clip (identity={identity}, clip={clip}) is outside the spec's "
            f"{spec.identities} identities x {spec.clips_per_identity} clips"
        )


def generate_clip(spec: SyntheticSpec, identity: int, clip: int) -> SyntheticClip:
    """Generate one clip: a pure function of ``(spec, identity, clip)``."""
    _check_indices(spec, identity, clip)
    person = make_identity(spec.seed, identity)
    num_samples = clip_num_samples(spec, identity, clip)
    num_frames = frame_count(num_samples, spec.fps, spec.sample_rate)

    utterance = plan_utterance(_rng(spec, identity, clip, SPEECH_STREAM), num_samples, spec.sample_rate,
                               person.pitch_hz, person.syllables_per_second)
    audio = synthesize_speech(utterance, person.pitch_hz, person.formant_scale,
                              _rng(spec, identity, clip, AUDIO_STREAM))
    controls = mouth_controls(utterance, num_frames, spec.fps)
    closure = blink_track(_rng(spec, identity, clip, BLINK_STREAM), num_frames, spec.fps)
    blink = np.stack([closure, closure], axis=1)  # (T, 2) left, right: both eyes blink together

    rig = build_rig(person.neutral_mesh)
    mesh3d = express(rig, controls.jaw_open, controls.spread, controls.pucker, blink).astype(np.float32)
    head_poses = pose6_to_matrix(head_motion(_rng(spec, identity, clip, MOTION_STREAM), num_frames, spec.fps,
                                             controls.envelope))  # (T, 4, 4)
    face_fraction = _rng(spec, identity, clip, CAMERA_STREAM).uniform(*FACE_FRACTION)
    trans_mat = (camera_placement(person.neutral_mesh, face_fraction) @ head_poses).astype(np.float32)
    # trans_mat[t] = trans_mat[0] @ M(pose6[t]): poses relative to the first frame.
    pose6 = matrix_to_pose6(np.linalg.inv(head_poses[0]) @ head_poses)

    mouth_open = np.linalg.norm(mesh3d[:, UPPER_INNER_LIP_CENTRE] - mesh3d[:, LOWER_INNER_LIP_CENTRE], axis=-1)
    landmarks = {
        "lmks": _landmarks(mesh3d, person.iris_points, trans_mat, spec.size),
        "mesh3d": mesh3d,
        "trans_mat": trans_mat,
        "blendshapes": _blendshapes(controls, blink),
        "valid": np.ones(num_frames, dtype=bool),
        "pose6": pose6.astype(np.float32),
        "mouth_open": mouth_open.astype(np.float32),
        "jaw_open": controls.jaw_open.astype(np.float32),
        "envelope": controls.envelope.astype(np.float32),
        "blink": blink.astype(np.float32),
        "neutral_mesh": person.neutral_mesh.astype(np.float32),
    }
    frames = FaceRenderer(person, rig, spec.size).render(mesh3d, trans_mat, controls.jaw_open)
    return SyntheticClip(frames=frames, audio=audio, landmarks=landmarks, fps=spec.fps, sample_rate=spec.sample_rate)


def write_clip(directory: str | os.PathLike, spec: SyntheticSpec, identity: int, clip: int) -> Path:
    """Generate a clip and write its audio, video and landmarks (each atomically, landmarks last)."""
    target = clip_dir(directory, clip_id(identity, clip))
    generated = generate_clip(spec, identity, clip)
    with atomic_path(target / "audio.wav") as tmp:
        write_wav(tmp, generated.audio, generated.sample_rate)
    write_video(target / "video.mp4", generated.frames, generated.fps, crf=VIDEO_CRF, preset=VIDEO_PRESET)
    save_landmarks(target / "landmarks.npz", generated.landmarks)
    return target


def _clip_complete(directory: Path, identity: int, clip: int) -> bool:
    target = clip_dir(directory, clip_id(identity, clip))
    return all((target / name).is_file() for name in CLIP_FILES)


def _single_threaded_worker() -> None:
    """Process-pool initializer: one core per worker, as the pool itself is the parallelism."""
    import cv2

    cv2.setNumThreads(1)


def ensure_synthetic_dataset(
    root: str | os.PathLike, spec: SyntheticSpec, workers: int = 1, progress: bool = True
) -> Path:
    """The dataset folder for ``spec`` under ``root``, generated on first use.

    Resumable: clips whose three files exist are kept; ``spec.json`` and then the manifest are written
    (atomically) last, so a folder with a manifest is complete. ``workers > 1`` generates clips in a
    process pool.
    """
    from tqdm.auto import tqdm

    directory = dataset_dir(root, spec)
    if (directory / MANIFEST_NAME).is_file():
        return directory
    jobs = [(identity, clip) for identity in range(spec.identities) for clip in range(spec.clips_per_identity)]
    pending = [job for job in jobs if not _clip_complete(directory, *job)]
    with tqdm(total=len(jobs), initial=len(jobs) - len(pending), unit="clip", disable=not progress,
              desc=f"synthetic data {directory.name}") as bar:
        if workers > 1 and len(pending) > 1:
            # spawn, not fork: the caller may hold threads (torch, loggers) that fork would corrupt.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(pending)), mp_context=context,
                                     initializer=_single_threaded_worker) as pool:
                futures = [pool.submit(write_clip, directory, spec, *job) for job in pending]
                for future in as_completed(futures):
                    future.result()
                    bar.update()
        else:
            for job in pending:
                write_clip(directory, spec, *job)
                bar.update()
    with atomic_path(directory / "spec.json") as tmp:
        tmp.write_text(json.dumps({"generator_version": GENERATOR_VERSION, **asdict(spec)}, indent=2) + "\n")
    Manifest(directory, [clip_record(spec, *job) for job in jobs]).save()
    return directory
