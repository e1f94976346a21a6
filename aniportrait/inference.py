"""``infer.py``: generate outputs from a bundle. One function per mode; each validates its inputs first,
computes, then writes every output atomically (temporary name, then rename), so a failure leaves nothing.

mode=landmarks   speech + portrait -> pose-image video (H.264, the speech muxed) and the predicted
                 meshes, poses and 2-D landmarks as .npz beside it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from aniportrait.audio.io import load_audio
from aniportrait.bundle import Bundle
from aniportrait.data.clip import load_landmarks
from aniportrait.data.video import write_video
from aniportrait.errors import AniPortraitError
from aniportrait.face.geometry import smooth_pose_sequence
from aniportrait.pipelines.landmarks import AudioToLandmarks, render_pose_images
from aniportrait.utils.atomic import atomic_path

__all__ = ["infer", "Portrait", "load_reference", "resolve_device", "check_output_path"]

log = logging.getLogger(__name__)


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise AniPortraitError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    return torch.device(name)


def check_output_path(output: str | None, suffix: str = ".mp4") -> Path:
    """The output file: its folder is created; an unwritable place is an error before any work."""
    if not output:
        raise AniPortraitError("no output given: add output=PATH.mp4")
    path = Path(os.path.expanduser(str(output)))
    if path.suffix.lower() != suffix:
        raise AniPortraitError(f"output={path} must end in {suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AniPortraitError(f"cannot create the output folder {path.parent} ({error.strerror}); choose output= elsewhere") from error
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise AniPortraitError(f"cannot write {path}: permission denied; choose a writable output=")
    return path


@dataclass
class Portrait:
    """The face that gets animated: its landmarks, pose-free mesh and camera transform."""

    lmks: np.ndarray  # (478, 3) normalised
    mesh3d: np.ndarray  # (468, 3)
    trans_mat: np.ndarray  # (4, 4)
    image_size: tuple[int, int]  # (height, width) the landmarks were measured in
    image: np.ndarray | None = None  # (H, W, 3) uint8 when the portrait is an image
    source: str = ""


def load_reference(path: str | os.PathLike, frame: int = 0, size: int = 512, landmarker_model: str | None = None) -> Portrait:
    """A portrait from a clip's landmarks.npz (frame ``frame``) or from an image (landmarks extracted)."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise AniPortraitError(f"reference not found: {path}; give a clip's landmarks.npz or a portrait image (reference=...)")
    if path.suffix == ".npz":
        arrays = load_landmarks(path)
        frames = arrays["lmks"].shape[0]
        if not 0 <= frame < frames or not bool(arrays["valid"][frame]):
            raise AniPortraitError(f"{path}: frame {frame} has no face (the clip has {frames} frames); choose reference_frame=")
        height = width = size
        video = path.parent / "video.mp4"
        if video.is_file():
            from aniportrait.data.video import probe_video

            info = probe_video(video)
            height, width = size, max(2, round(size * info.width / info.height / 2) * 2)
        return Portrait(arrays["lmks"][frame], arrays["mesh3d"][frame], arrays["trans_mat"][frame], (height, width), source=str(path))
    try:
        from aniportrait.face.portrait import load_portrait
    except ImportError as error:  # pragma: no cover - the portrait loader ships with the face package
        raise AniPortraitError(f"cannot read portrait images in this installation ({error})") from error
    portrait = load_portrait(path, size=size, landmarker_model=landmarker_model)
    return Portrait(portrait.lmks, portrait.mesh3d, portrait.trans_mat, portrait.image.shape[:2], portrait.image, str(path))


def _pose_template(path: str | os.PathLike, frames: int) -> np.ndarray:
    """An official pose_temp.npy (N, 6), mirrored and cycled to ``frames`` as the official audio2vid does."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise AniPortraitError(f"pose template not found: {path} (pose.template=)")
    template = np.load(path)
    if template.ndim != 2 or template.shape[1] != 6 or len(template) < 2:
        raise AniPortraitError(f"{path}: a pose template is an (N, 6) array of Euler degrees + translation, got {template.shape}")
    mirrored = np.concatenate([template, template[-2:0:-1]], axis=0)
    return np.tile(mirrored, (frames // len(mirrored) + 1, 1))[:frames]


def _summary(output: Path, frames: int, fps: float, seconds: float, device: torch.device) -> str:
    return (f"{output}: {frames} frames ({frames / fps:.2f} s at {fps:g} fps) in {seconds:.1f} s, "
            f"{seconds / max(frames, 1):.3f} s/frame, {device}")


def infer_landmarks(cfg: DictConfig) -> Path:
    """Stage A: speech + portrait -> pose-image video with audio, plus meshes/poses/landmarks (.npz)."""
    started = time.perf_counter()
    output = check_output_path(cfg.output)
    if not cfg.get("bundle"):
        raise AniPortraitError("no bundle given: add bundle=PATH (a training run prints `bundle: <path>`) "
                               "or set ANIPORTRAIT_BUNDLE")
    if not cfg.get("audio"):
        raise AniPortraitError("mode=landmarks needs speech: add audio=PATH (wav, flac, mp3, m4a)")
    if not cfg.get("reference"):
        raise AniPortraitError("mode=landmarks needs a portrait: add reference=PATH (a clip's landmarks.npz or an image)")
    bundle = Bundle.open(cfg.bundle)
    bundle.require("audio2mesh", purpose="mode=landmarks")
    device = resolve_device(cfg.get("device"))
    portrait = load_reference(cfg.reference, int(cfg.get("reference_frame", 0)), int(cfg.size),
                              cfg.get("face", {}).get("landmarker_model"))
    audio = load_audio(cfg.audio)
    landmarks_model = AudioToLandmarks.from_bundle(bundle, device)
    fps = float(cfg.fps or landmarks_model.fps)
    landmarks_model.fps = fps
    pose_cfg = cfg.get("pose", {}) or {}
    overrides = {k: v for k, v in {"rotation_scale": pose_cfg.get("rotation_scale"),
                                   "smooth_window": pose_cfg.get("smooth_window")}.items() if v is not None}
    prediction = landmarks_model.predict(audio, portrait.mesh3d, identity=cfg.get("identity"), pose_overrides=overrides)
    frames = prediction.meshes.shape[0]
    if cfg.get("length"):
        frames = min(frames, int(cfg.length))
    poses = prediction.poses[:frames]
    source = pose_cfg.get("source", "predicted")
    if source == "still" or (source == "predicted" and landmarks_model.audio2pose is None):
        poses = np.zeros((frames, 6))
    elif source == "template":
        if not pose_cfg.get("template"):
            raise AniPortraitError("pose.source=template needs pose.template=PATH (an official pose_temp.npy)")
        poses = _pose_template(pose_cfg.template, frames)
        if pose_cfg.get("smooth_window"):
            poses = smooth_pose_sequence(poses, int(pose_cfg.smooth_window))
    elif source != "predicted":
        raise AniPortraitError(f"pose.source must be predicted, still or template, got {source!r}")
    meshes = prediction.meshes[:frames]
    pixels, pose_images = render_pose_images(meshes, portrait.trans_mat, poses, portrait.image_size)
    samples = round(frames / fps * 16000)
    arrays_path = output.with_suffix(".npz")
    with atomic_path(arrays_path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, meshes=meshes.astype(np.float32), poses=poses.astype(np.float32),
                                landmarks=pixels.astype(np.float32), trans_mat=portrait.trans_mat.astype(np.float32),
                                image_size=np.array(portrait.image_size), fps=np.float32(fps))
        write_video(output, pose_images, fps, audio=audio[:samples])
    print(_summary(output, frames, fps, time.perf_counter() - started, device))
    return output


MODES = {"landmarks": infer_landmarks}


def infer(cfg: DictConfig):
    mode = cfg.get("mode")
    if mode not in MODES:
        raise AniPortraitError(f"unknown mode={mode!r}; choose one of {', '.join(MODES)}")
    return MODES[mode](cfg)
