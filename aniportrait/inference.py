"""``infer.py``: generate outputs from a bundle. One function per mode; each validates its inputs first,
computes, then writes every output atomically (temporary name, then rename), so a failure leaves nothing.

mode=landmarks   speech + portrait -> pose-image video (H.264, the speech muxed) and the predicted
                 meshes, poses and 2-D landmarks as .npz beside it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from aniportrait.audio.io import load_audio
from aniportrait.bundle import Bundle
from aniportrait.data.video import write_video
from aniportrait.errors import AniPortraitError
from aniportrait.face.geometry import smooth_pose_sequence
from aniportrait.face.portrait import Portrait, load_portrait, portrait_from_landmarks_npz
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


def load_reference(path: str | os.PathLike, frame: int = 0, size: int = 512, landmarker_model: str | None = None) -> Portrait:
    """A portrait from a clip's landmarks.npz (frame ``frame``) or from an image (landmarks extracted)."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise AniPortraitError(f"reference not found: {path}; give a portrait image or a clip's landmarks.npz (reference=...)")
    if path.suffix == ".npz":
        return portrait_from_landmarks_npz(path, frame=frame, size=size)
    return load_portrait(path, size=size, landmarker_model=landmarker_model)


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


def _audio_driven(cfg: DictConfig, portrait: Portrait, device: torch.device):
    """Speech -> (meshes, poses, fps, audio) with the bundle's Audio2Mesh (+ Audio2Pose)."""
    if not cfg.get("bundle"):
        raise AniPortraitError("no bundle given: add bundle=PATH (a training run prints `bundle: <path>`) "
                               "or set ANIPORTRAIT_BUNDLE")
    bundle = Bundle.open(cfg.bundle)
    bundle.require("audio2mesh", purpose="audio-driven landmarks")
    audio = load_audio(cfg.audio)
    model = AudioToLandmarks.from_bundle(bundle, device)
    if cfg.get("fps"):
        model.fps = float(cfg.fps)
    pose_cfg = cfg.get("pose", {}) or {}
    overrides = {k: v for k, v in {"rotation_scale": pose_cfg.get("rotation_scale"),
                                   "smooth_window": pose_cfg.get("smooth_window")}.items() if v is not None}
    prediction = model.predict(audio, portrait.mesh3d, identity=cfg.get("identity"), pose_overrides=overrides)
    frames = prediction.meshes.shape[0] if not cfg.get("length") else min(prediction.meshes.shape[0], int(cfg.length))
    source = pose_cfg.get("source", "auto")
    if source in ("auto", "predicted") and model.audio2pose is not None:
        poses = prediction.poses[:frames]
    elif source in ("auto", "predicted", "still"):
        poses = np.zeros((frames, 6))
    elif source == "template":
        poses = _template_poses(pose_cfg, frames)
    else:
        raise AniPortraitError(f"pose.source must be auto, predicted, still or template with audio=, got {source!r}")
    return prediction.meshes[:frames], poses, model.fps, audio


def _video_driven(cfg: DictConfig, portrait: Portrait, image_size: tuple[int, int]):
    """Driving video -> (meshes, poses, fps, audio or None): its landmarks retargeted onto the portrait."""
    from aniportrait.data.video import probe_video
    from aniportrait.face.landmarks import detect_video_file
    from aniportrait.face.retarget import retarget

    pose_cfg = cfg.get("pose", {}) or {}
    source = pose_cfg.get("source", "auto")
    modes = {"auto": "driver", "driver": "driver", "still": "portrait", "template": "template"}
    if source not in modes:
        raise AniPortraitError(f"pose.source must be auto, driver, still or template with video=, got {source!r}")
    if source == "template" and not pose_cfg.get("template"):
        raise AniPortraitError("pose.source=template needs pose.template=PATH (an official pose_temp.npy)")
    info = probe_video(cfg.video)
    driving, fps = detect_video_file(cfg.video, model_path=(cfg.get("face") or {}).get("landmarker_model"),
                                     max_frames=cfg.get("length"))
    result = retarget(portrait, driving, pose=modes[source], pose_template=pose_cfg.get("template"), image_size=image_size,
                      pose_smooth_window=int(pose_cfg.get("smooth_window") or 1))
    audio = load_audio(cfg.video) if info.has_audio else None
    return result.meshes, result.poses, fps, audio


def _template_poses(pose_cfg, frames: int) -> np.ndarray:
    if not pose_cfg.get("template"):
        raise AniPortraitError("pose.source=template needs pose.template=PATH (an official pose_temp.npy)")
    poses = _pose_template(pose_cfg.template, frames)
    if pose_cfg.get("smooth_window"):
        poses = smooth_pose_sequence(poses, int(pose_cfg.smooth_window))
    return poses


def infer_landmarks(cfg: DictConfig) -> Path:
    """Stage A: speech (audio=) or a driving video (video=) + portrait -> pose-image video with the audio muxed,
    plus the meshes, poses and 2-D landmarks (.npz beside the video)."""
    started = time.perf_counter()
    output = check_output_path(cfg.output)
    if bool(cfg.get("audio")) == bool(cfg.get("video")):
        raise AniPortraitError("mode=landmarks needs exactly one driver: audio=SPEECH (wav, flac, mp3, m4a) or "
                               "video=DRIVING.mp4")
    if not cfg.get("reference"):
        raise AniPortraitError("mode=landmarks needs a portrait: add reference=PATH (an image or a clip's landmarks.npz)")
    device = resolve_device(cfg.get("device"))
    portrait = load_reference(cfg.reference, int(cfg.get("reference_frame", 0)), int(cfg.size),
                              (cfg.get("face") or {}).get("landmarker_model"))
    image_size = portrait.image.shape[:2]
    if cfg.get("audio"):
        meshes, poses, fps, audio = _audio_driven(cfg, portrait, device)
    else:
        meshes, poses, fps, audio = _video_driven(cfg, portrait, image_size)
    frames = len(meshes)
    pixels, pose_images = render_pose_images(meshes, portrait.trans_mat, poses, image_size)
    arrays_path = output.with_suffix(".npz")
    with atomic_path(arrays_path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, meshes=meshes.astype(np.float32), poses=poses.astype(np.float32),
                                landmarks=pixels.astype(np.float32), trans_mat=portrait.trans_mat.astype(np.float32),
                                image_size=np.array(image_size), fps=np.float32(fps))
        muxed = None if audio is None else audio[: round(frames / fps * 16000)]
        write_video(output, pose_images, fps, audio=muxed)
    print(_summary(output, frames, fps, time.perf_counter() - started, device))
    return output


MODES = {"landmarks": infer_landmarks}


def infer(cfg: DictConfig):
    mode = cfg.get("mode")
    if mode not in MODES:
        raise AniPortraitError(f"unknown mode={mode!r}; choose one of {', '.join(MODES)}")
    return MODES[mode](cfg)
