"""The metric suite of the video benchmark: builds every metric network once, scores clip pairs, aggregates.

A :class:`ClipPair` holds one test clip's ground truth and the videos scored against it ("methods": the
generated video, and the sanity rows ``ground_truth`` (the ground truth against itself) and
``copy_reference`` (the reference frame repeated for every frame)), already aligned to the same frames.
:func:`prepare_sample` does the CPU work of a video (face landmarks, SyncNet face crops) and runs in data
loader workers; :class:`MetricSuite` does the network work on the chosen device in the main process.

Aggregation over clips: per-frame metrics (SSIM, PSNR, LPIPS, LMD, blendshape error, CSIM) are averaged over
all scored frames of all clips (frame-weighted); LSE-D / LSE-C are averaged over clips, as SyncNet scores
are per video; FID pools the frames, FVD the 16-frame windows, of all clips into one set per method.
A metric that cannot be computed is None with a reason, never a number.

Every row covers the same clips: a clip enters the aggregates (FID/FVD sets included, the ground truth's too)
only when its ``generated`` video could be scored, and a metric of a clip only when every method has it (a
faceless generated video leaves that clip's landmark metrics out of the sanity rows too). What was left out,
and why, is in :attr:`MetricSuite.left_out` and each row's notes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import torch

from aniportrait.errors import AniPortraitError
from aniportrait.metrics.fid import FrechetInceptionDistance, load_inception, random_inception
from aniportrait.metrics.fvd import FrechetVideoDistance, clip_starts, load_i3d, random_i3d
from aniportrait.metrics.identity import (
    IdentitySimilarity,
    align_faces,
    five_points,
    load_arcface,
    random_arcface,
)
from aniportrait.metrics.landmarks import (
    FACE_MESH_POINTS,
    MOUTH_POINTS,
    blendshape_error_per_frame,
    landmark_distance_per_frame,
)
from aniportrait.metrics.lpips_metric import LPIPS, build_lpips, load_backbone_state_dict
from aniportrait.metrics.pixel import psnr_per_frame, ssim_per_frame
from aniportrait.metrics.sync import (
    SYNC_FPS,
    SyncMetric,
    crop_boxes,
    crop_faces,
    load_syncnet,
    random_syncnet,
    resample_indices,
    to_pcm16,
)
from aniportrait.metrics.weights import MetricUnavailable, file_digest, resolve_weights

__all__ = [
    "METRICS",
    "HIGHER_IS_BETTER",
    "REFERENCE_VALUED",
    "VideoSample",
    "ClipPair",
    "MetricSuite",
    "detect_landmarks",
    "prepare_sample",
    "copy_reference_sample",
]

log = logging.getLogger(__name__)

# Reported metric -> the suite component that computes it (``metrics.enabled`` lists components).
METRICS: dict[str, str] = {
    "fid": "fid", "fvd": "fvd", "lpips": "lpips", "ssim": "ssim", "psnr": "psnr",
    "lse_d": "sync", "lse_c": "sync", "av_offset": "sync",
    "lmd_face": "landmarks", "lmd_mouth": "landmarks", "blendshape_error": "landmarks", "jitter_mouth": "landmarks",
    "face_detection_rate": "landmarks", "csim": "identity",
}
HIGHER_IS_BETTER = {"ssim": True, "psnr": True, "lse_c": True, "csim": True, "fid": False, "fvd": False,
                    "lpips": False, "lse_d": False, "lmd_face": False, "lmd_mouth": False, "blendshape_error": False,
                    "face_detection_rate": True}
# Not better either way: compared with the ground truth's own value (the ground_truth sanity row).
REFERENCE_VALUED = ("jitter_mouth", "av_offset")
COMPONENTS = ("fid", "fvd", "lpips", "ssim", "psnr", "sync", "landmarks", "identity")


@dataclass
class VideoSample:
    """One video aligned to its clip: what the metrics read."""

    frames: torch.Tensor  # (T, H, W, 3) uint8 RGB
    fps: float
    audio: np.ndarray | None = None  # 16 kHz mono float32; None: no audio track
    landmarks: dict[str, np.ndarray] | None = None  # lmks (T, 478, 3) normalised, blendshapes (T, 52), valid (T,)
    sync_crops: np.ndarray | None = None  # (T25, 224, 224, 3) uint8 BGR at 25 fps
    notes: dict[str, str] = field(default_factory=dict)  # component -> why it is unavailable for this video
    still: bool = False  # every frame is the first one (features computed once)


@dataclass
class ClipPair:
    """A test clip: its ground truth and the videos scored against it (method name -> sample)."""

    clip_id: str
    reference: VideoSample | None
    methods: dict[str, VideoSample] = field(default_factory=dict)  # the scorable ones
    status: dict[str, str] = field(default_factory=dict)  # every method -> "ok" | "missing" | "corrupt: ..."
    alignment: dict[str, Any] = field(default_factory=dict)  # what was done to make the videos comparable


# -- CPU side (data loader workers) -----------------------------------------------------------------------


def detect_landmarks(frames: np.ndarray, fps: float, model_path: str) -> dict[str, np.ndarray]:
    """MediaPipe landmarks of every frame (VIDEO mode, one face): lmks (T, 478, 3), blendshapes (T, 52), valid (T,)."""
    from aniportrait.face.landmarks import FaceLandmarker

    count = len(frames)
    arrays = {"lmks": np.zeros((count, 478, 3), np.float32), "blendshapes": np.zeros((count, 52), np.float32),
              "valid": np.zeros(count, bool)}
    with FaceLandmarker(model_path, mode="video", max_faces=1) as landmarker:
        for index, frame in enumerate(frames):
            face = landmarker.detect(np.ascontiguousarray(frame), round(index * 1000.0 / fps))
            if face is not None:
                arrays["lmks"][index], arrays["blendshapes"][index], arrays["valid"][index] = face.lmks, face.blendshapes, True
    return arrays


def _filled(lmks: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Landmarks with invalid frames linearly interpolated from the valid ones (held at the ends)."""
    known = np.flatnonzero(valid)
    flat = lmks.reshape(len(lmks), -1)
    columns = [np.interp(np.arange(len(lmks)), known, flat[known, j]) for j in range(flat.shape[1])]
    return np.stack(columns, axis=1).reshape(lmks.shape).astype(np.float32)


def _sync_crops(frames: np.ndarray, fps: float, lmks: np.ndarray, valid: np.ndarray, crop_scale: float) -> np.ndarray:
    """(T, H, W, 3) RGB frames + normalised landmarks -> (T25, 224, 224, 3) BGR face crops at 25 fps."""
    height, width = frames.shape[1:3]
    indices = resample_indices(len(frames), fps, SYNC_FPS)
    pixels = _filled(lmks, valid)[indices][:, list(FACE_MESH_POINTS), :2] * np.array([width, height], np.float32)
    return crop_faces(frames[indices][..., ::-1], crop_boxes(pixels), crop_scale)


def prepare_sample(sample: VideoSample, settings: dict, landmarker_model: str | None,
                   clip_landmarks: np.ndarray | None) -> VideoSample:
    """Face landmarks and SyncNet crops of one video (CPU). ``clip_landmarks``: the clip's lmks (T, 478, 3).

    settings: the protocol's ``sync`` section plus ``components`` (the enabled suite components).
    """
    if landmarker_model is not None and {"landmarks", "identity", "sync"} & settings["components"]:
        sample.landmarks = detect_landmarks(sample.frames.numpy(), sample.fps, landmarker_model)
        if not sample.landmarks["valid"].any():
            sample.notes["landmarks"] = sample.notes["identity"] = "no face found in any frame"
    _attach_sync_crops(sample, settings, landmarker_model is not None, clip_landmarks)
    return sample


def _attach_sync_crops(sample: VideoSample, settings: dict, have_landmarker: bool, clip_landmarks: np.ndarray | None) -> None:
    """SyncNet face crops from the video's own landmarks (``crop_from: video``) or the clip's (``clip``)."""
    if "sync" not in settings["components"]:
        return
    if sample.audio is None:
        sample.notes.setdefault("sync", "the video has no audio track")
        return
    frames = sample.frames.numpy()
    use_video = settings["crop_from"] == "video" or (settings["crop_from"] == "auto" and have_landmarker)
    if use_video and sample.landmarks is not None and sample.landmarks["valid"].any():
        lmks, valid = sample.landmarks["lmks"], sample.landmarks["valid"]
    elif not use_video and clip_landmarks is not None:
        lmks, valid = clip_landmarks[: len(frames)], np.ones(len(frames), bool)
    else:
        sample.notes["sync"] = "no face landmarks to crop the face from"
        return
    sample.sync_crops = _sync_crops(frames, sample.fps, lmks, valid, settings["crop_scale"])


def copy_reference_sample(reference: VideoSample, frame: int, settings: dict, have_landmarker: bool,
                          clip_landmarks: np.ndarray | None, count: int | None = None,
                          audio: np.ndarray | None = None) -> VideoSample:
    """The "copy the reference frame" baseline: frame ``frame`` of ``reference`` (the ground truth, or the reference
    frame alone) for each of ``count`` frames (default: the reference's length), with ``audio`` (default the
    reference's); its landmarks are that frame's, repeated (no second detection)."""
    count = len(reference.frames) if count is None else int(count)
    still = VideoSample(reference.frames[frame : frame + 1].expand(count, -1, -1, -1), reference.fps,
                        reference.audio if audio is None else audio,
                        notes={key: value for key, value in reference.notes.items() if key != "sync"}, still=True)
    if reference.landmarks is not None:
        still.landmarks = {key: np.repeat(value[frame : frame + 1], count, axis=0) for key, value in reference.landmarks.items()}
    if clip_landmarks is not None:
        clip_landmarks = np.repeat(clip_landmarks[frame : frame + 1], count, axis=0)
    _attach_sync_crops(still, settings, have_landmarker, clip_landmarks)
    return still


# -- network side -----------------------------------------------------------------------------------------


def _package_versions() -> dict[str, str]:
    versions = {}
    for package in ("torch", "torchmetrics", "torch-fidelity", "lpips", "mediapipe", "scipy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


class MetricSuite:
    """Every metric of the benchmark, built once; :meth:`score` one clip, :meth:`summary` the aggregate.

    ``networks`` maps a component to its ready metric object (FrechetInceptionDistance, FrechetVideoDistance,
    LPIPS, SyncMetric, IdentitySimilarity; the string path of the MediaPipe model for ``landmarks``; True for
    ``ssim`` / ``psnr``); ``unavailable`` maps a component to the reason it is absent.
    """

    def __init__(self, networks: dict[str, Any], unavailable: dict[str, str], protocol: dict, device: torch.device,
                 enabled: set[str] | None = None, weights: dict[str, str] | None = None):
        self.networks = networks
        self.enabled = set(COMPONENTS if enabled is None else enabled)
        self.unavailable = unavailable
        self.protocol = protocol
        self.device = device
        self.weights = weights or {}
        self._sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._pending: list[tuple[str, str, float, int]] = []  # one clip's values, added once all methods have them
        self.left_out: dict[str, dict[str, str]] = defaultdict(dict)  # metric -> clip -> why it is in no average
        self.fvd_windows: dict[str, list[int]] = {}
        self.timings: dict[str, float] = defaultdict(float)  # seconds per component, summed over clips

    # construction ----------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, metrics: dict, protocol: dict, device: str | torch.device = "cpu") -> MetricSuite:
        """Build the enabled components from ``metrics`` (conf/metrics) and ``protocol`` (conf/protocol).

        Weights: ``metrics.random_init`` -> seeded random weights of the same architectures (pipeline tests,
        speed benchmarks; the numbers mean nothing); else the local path in ``metrics.<key>``, else the cached
        download; a component whose weights cannot be had is listed in ``unavailable`` with the reason.
        """
        device = torch.device(device)
        enabled = list(metrics.get("enabled") or COMPONENTS)
        unknown = sorted(set(enabled) - set(COMPONENTS))
        if unknown:
            raise AniPortraitError(f"metrics.enabled lists unknown metrics {unknown}; choose from {list(COMPONENTS)}")
        random_init = metrics.get("random_init") or {}
        seed = int(random_init.get("seed", 0))
        use_random = bool(random_init.get("enabled", False))
        download = bool(metrics.get("download", True))
        networks: dict[str, Any] = {}
        unavailable: dict[str, str] = {}
        weights: dict[str, str] = {}

        def weight_file(name: str, key: str):
            path = resolve_weights(name, metrics.get(key), download)
            weights[name] = f"{path} (sha256 {file_digest(path)})"
            return path

        def builders() -> dict[str, Any]:
            fid, fvd, lpips_cfg, sync = (protocol.get(k, {}) for k in ("fid", "fvd", "lpips", "sync"))
            net = lpips_cfg.get("net", "alex")
            return {
                "fid": lambda: FrechetInceptionDistance(
                    random_inception(seed, fid.get("antialias", False)) if use_random
                    else load_inception(weight_file("inception", "inception"), fid.get("antialias", False)),
                    device, fid.get("batch_size", 64)),
                "fvd": lambda: FrechetVideoDistance(
                    random_i3d(float(random_init.get("i3d_width", 1.0)), seed) if use_random
                    else load_i3d(weight_file("i3d", "i3d"), device), device, fvd.get("batch_size", 8)),
                "lpips": lambda: LPIPS(build_lpips(net, None if use_random else load_backbone_state_dict(
                    weight_file(f"lpips_{net}", "lpips_backbone"))), device, lpips_cfg.get("batch_size", 16)),
                "ssim": lambda: True,
                "psnr": lambda: True,
                "sync": lambda: SyncMetric(random_syncnet(seed) if use_random else load_syncnet(weight_file("syncnet", "syncnet")),
                                           device, sync.get("batch_size", 64), sync.get("vshift", 15)),
                "landmarks": lambda: _landmarker_path(metrics.get("face_landmarker"), download),
                "identity": lambda: IdentitySimilarity(
                    random_arcface(seed) if use_random else load_arcface(weight_file("arcface", "arcface")), device),
            }

        build = builders()
        needs_landmarks = {"landmarks", "identity"} & set(enabled) or (
            "sync" in enabled and protocol.get("sync", {}).get("crop_from", "auto") != "clip")
        for component in COMPONENTS:
            wanted = component in enabled or (component == "landmarks" and needs_landmarks)
            if not wanted:
                continue
            try:
                networks[component] = build[component]()
            except MetricUnavailable as error:
                unavailable[component] = str(error)
            except (OSError, RuntimeError, ValueError, KeyError, AniPortraitError) as error:
                unavailable[component] = f"cannot load its network ({type(error).__name__}: {error})"
        if "identity" in networks and "landmarks" not in networks:
            unavailable["identity"] = f"needs face landmarks for alignment: {unavailable['landmarks']}"
            del networks["identity"]
        if use_random:
            weights = {component: f"random-init (seed {seed}): numbers only test the pipeline"
                       for component in networks if component not in ("ssim", "psnr", "landmarks")}
        if "landmarks" in networks:
            weights["face_landmarker"] = f"{networks['landmarks']} (sha256 {file_digest(networks['landmarks'])})"
        return cls(networks, unavailable, protocol, device, set(enabled), weights)

    @property
    def components(self) -> set[str]:
        """Enabled components that are available (what :func:`prepare_sample` must prepare for)."""
        return {component for component in self.networks if component in self.enabled}

    @property
    def landmarker_model(self) -> str | None:
        return self.networks.get("landmarks")

    def versions(self) -> dict[str, Any]:
        """What produced the numbers: package versions and each network's weights."""
        return {"packages": _package_versions(), "weights": self.weights}

    # scoring ---------------------------------------------------------------------------------------------

    def _add(self, method: str, metric: str, value: float, count: int = 1) -> None:
        self._pending.append((method, metric, value, count))

    def _commit(self, clip_id: str, rows: list[dict[str, Any]], notes: dict[str, dict[str, str]]) -> None:
        """Add one clip's values to the aggregates: only the metrics every scored method of the clip has."""
        pending, self._pending = self._pending, []
        methods = {row["method"] for row in rows if row["status"] == "ok"}
        have = {metric: {method for method, name, _, _ in pending if name == metric} for _, metric, _, _ in pending}
        for method, metric, value, count in pending:
            if have[metric] == methods:
                self._sums[method][metric] += value * count
                self._counts[method][metric] += count
        for metric, present in have.items():
            lacking = sorted(methods - present)
            if lacking:
                why = "; ".join(f"{method}: {notes.get(method, {}).get(METRICS[metric], 'not computed')}"
                                for method in lacking)
                self.left_out[metric][clip_id] = why
                for row in rows:
                    if metric in row:
                        note = f"{metric}: in no row's average ({why})"
                        row["notes"] = "; ".join(filter(None, [row.get("notes"), note]))

    def _not_scored(self, pair: ClipPair, primary: str) -> list[dict[str, Any]]:
        """Rows of a clip no method is scored on (its ground truth or its generated video cannot be read)."""
        reason = pair.status.get(primary, "no reference") if pair.reference is not None else "ground truth unreadable"
        rows = []
        for method, status in pair.status.items():
            status = status if status != "ok" else f"not scored: {primary} video {reason} (every row covers the same clips)"
            rows.append({"clip": pair.clip_id, "method": method, "status": status})
        for metric, component in METRICS.items():
            if component in self.components:
                self.left_out[metric][pair.clip_id] = f"{primary} video {reason}"
        return rows

    @contextlib.contextmanager
    def _timed(self, component: str) -> Iterator[None]:
        """Accumulate wall time per component in ``timings`` (CUDA work finished before the clock is read)."""
        started = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[component] += time.perf_counter() - started

    def score(self, pair: ClipPair, primary: str = "generated") -> list[dict[str, Any]]:
        """Score every method of one clip; returns one row per method (clip, method, status, metrics, notes).
        Nothing of the clip counts when the ``primary`` method's video cannot be scored (see the module doc)."""
        if pair.reference is None or (primary in pair.status and (pair.status[primary] != "ok"
                                                                    or primary not in pair.methods)):
            return self._not_scored(pair, primary)
        rows = []
        method_notes: dict[str, dict[str, str]] = {}
        reference = pair.reference
        fid, fvd = self.networks.get("fid"), self.networks.get("fvd")
        stride = int(self.protocol.get("fid", {}).get("frame_stride", 1))
        cache: dict[str, torch.Tensor] = {}
        windows: list[int] = []
        identity_source = None
        if reference is not None:
            reference_frames = reference.frames.to(self.device)
            if fid:
                with self._timed("fid"):
                    cache["fid"] = fid.update("reference", reference_frames[::stride])
            if fvd:
                windows = self._windows(pair.clip_id, len(reference.frames))
                if windows:
                    with self._timed("fvd"):
                        cache["fvd"] = fvd.update("reference", self._clips(reference_frames, windows))
            if "identity" in self.components:
                with self._timed("identity"):
                    identity_source = self._identity_source(reference)
        for method, status in pair.status.items():
            row: dict[str, Any] = {"clip": pair.clip_id, "method": method, "status": status}
            sample = pair.methods.get(method)
            if status != "ok" or sample is None or reference is None:
                rows.append(row)
                continue
            row["frames"] = len(sample.frames)
            notes = dict(sample.notes)
            frames = reference_frames if sample is reference else sample.frames.to(self.device)
            self._pixel_metrics(method, row, frames, reference_frames)
            if fid:
                with self._timed("fid"):
                    fid.add_features(method, self._features(fid, frames[::stride], sample, reference, cache.get("fid")))
            if windows:
                with self._timed("fvd"):
                    fvd.add_features(method, self._features(fvd, self._clips(frames, windows), sample, reference,
                                                            cache.get("fvd")))
            with self._timed("landmarks"):
                self._landmark_metrics(method, row, notes, sample, reference)
            with self._timed("identity"):
                self._identity_metric(method, row, notes, sample, identity_source)
            with self._timed("sync"):
                self._sync_metric(method, row, notes, sample)
            row["notes"] = "; ".join(f"{key}: {value}" for key, value in sorted(notes.items()))
            method_notes[method] = notes
            rows.append(row)
        self._commit(pair.clip_id, rows, method_notes)
        return rows

    @staticmethod
    def _features(metric: FrechetInceptionDistance | FrechetVideoDistance, inputs: torch.Tensor, sample: VideoSample,
                  reference: VideoSample, reference_features: torch.Tensor | None) -> torch.Tensor:
        """Features of ``inputs`` (frames or windows), reusing the ground truth's and computing a still video's once."""
        if sample is reference:
            return reference_features
        if sample.still:
            return metric.features(inputs[:1]).expand(len(inputs), -1)
        return metric.features(inputs)

    def _windows(self, clip_id: str, frames: int) -> list[int]:
        fvd = self.protocol.get("fvd", {})
        starts = clip_starts(frames, clip_id, int(fvd.get("clip_frames", 16)), int(fvd.get("clips_per_video", 1)),
                             int(fvd.get("frame_stride", 1)), int(fvd.get("seed", 0)))
        self.fvd_windows[clip_id] = starts
        return starts

    def _clips(self, frames: torch.Tensor, starts: list[int]) -> torch.Tensor:
        """(T, H, W, 3) -> (n, clip_frames, H, W, 3) FVD windows."""
        fvd = self.protocol.get("fvd", {})
        length, stride = int(fvd.get("clip_frames", 16)), int(fvd.get("frame_stride", 1))
        return torch.stack([frames[start : start + (length - 1) * stride + 1 : stride] for start in starts])

    def _pixel_metrics(self, method: str, row: dict, frames: torch.Tensor, reference: torch.Tensor) -> None:
        per_frame = {"ssim": lambda: ssim_per_frame(frames, reference), "psnr": lambda: psnr_per_frame(frames, reference),
                     "lpips": lambda: self.networks["lpips"](frames, reference)}
        for metric, compute in per_frame.items():
            if metric in self.networks:
                with self._timed(metric):
                    row[metric] = float(compute().mean())
                self._add(method, metric, row[metric], len(frames))

    def _landmark_metrics(self, method: str, row: dict, notes: dict, sample: VideoSample, reference: VideoSample) -> None:
        if "landmarks" not in self.components:
            return
        if sample.landmarks is None or reference.landmarks is None:
            notes.setdefault("landmarks", "no landmarks")
            return
        both = sample.landmarks["valid"] & reference.landmarks["valid"]
        if not both.any():
            notes.setdefault("landmarks", "no frame with a face in both videos")
            return
        height, width = sample.frames.shape[1:3]
        scale = np.array([width, height], np.float64)
        generated_px = sample.landmarks["lmks"][both, :, :2] * scale
        reference_px = reference.landmarks["lmks"][both, :, :2] * scale
        values = {
            "lmd_face": landmark_distance_per_frame(generated_px, reference_px, FACE_MESH_POINTS),
            "lmd_mouth": landmark_distance_per_frame(generated_px, reference_px, MOUTH_POINTS),
            "blendshape_error": blendshape_error_per_frame(sample.landmarks["blendshapes"][both],
                                                           reference.landmarks["blendshapes"][both]),
        }
        for metric, per_frame in values.items():
            row[metric] = float(per_frame.mean())
            self._add(method, metric, row[metric], int(both.sum()))
        own = sample.landmarks["valid"]
        row["face_detection_rate"] = float(own.mean())  # of the scored frames, in the video's own detection
        self._add(method, "face_detection_rate", row["face_detection_rate"], len(own))
        steps = own[1:] & own[:-1]  # consecutive frames both with a face
        if steps.any():
            own_px = sample.landmarks["lmks"][:, list(MOUTH_POINTS), :2] * scale
            row["jitter_mouth"] = float(np.linalg.norm(own_px[1:] - own_px[:-1], axis=-1).mean(axis=-1)[steps].mean())
            self._add(method, "jitter_mouth", row["jitter_mouth"], int(steps.sum()))
        if not both.all():
            notes["landmarks"] = f"{int(both.sum())}/{len(both)} frames with a face in both videos"

    def _identity_source(self, reference: VideoSample) -> torch.Tensor | None:
        """Embedding of the identity source: the reference frame of the ground truth (or its first face)."""
        if reference.landmarks is None or not reference.landmarks["valid"].any():
            return None
        valid = reference.landmarks["valid"]
        frame = int(self.protocol.get("reference_frame", 0))
        frame = frame if frame < len(valid) and valid[frame] else int(np.argmax(valid))
        return self._embeddings(reference.frames[frame : frame + 1].numpy(), reference.landmarks["lmks"][frame : frame + 1])[0]

    def _embeddings(self, frames: np.ndarray, lmks: np.ndarray) -> torch.Tensor:
        height, width = frames.shape[1:3]
        points = five_points(lmks[..., :2] * np.array([width, height], np.float32))
        return self.networks["identity"].embeddings(align_faces(frames, points))

    def _identity_metric(self, method: str, row: dict, notes: dict, sample: VideoSample, source: torch.Tensor | None) -> None:
        if "identity" not in self.components:
            return
        if source is None:
            notes["identity"] = "no face in the ground truth to take the identity from"
            return
        if sample.landmarks is None or not sample.landmarks["valid"].any():
            notes.setdefault("identity", "no face found")
            return
        valid = sample.landmarks["valid"]
        if sample.still:
            valid = valid & (np.arange(len(valid)) == np.argmax(valid))  # one embedding stands for every frame
        embeddings = self._embeddings(sample.frames.numpy()[valid], sample.landmarks["lmks"][valid])
        row["csim"] = float((embeddings @ source).mean())
        self._add(method, "csim", row["csim"], int(sample.landmarks["valid"].sum()))

    def _sync_metric(self, method: str, row: dict, notes: dict, sample: VideoSample) -> None:
        if "sync" not in self.components:
            return
        if sample.sync_crops is None:
            notes.setdefault("sync", "no face crops")
            return
        try:
            scores = self.networks["sync"](sample.sync_crops, to_pcm16(sample.audio))
        except ValueError as error:
            notes["sync"] = str(error)
            return
        row.update(lse_d=scores.lse_d, lse_c=scores.lse_c, av_offset=scores.offset)
        for metric in ("lse_d", "lse_c", "av_offset"):
            self._add(method, metric, row[metric])

    # aggregation -----------------------------------------------------------------------------------------

    def summary(self, methods: list[str]) -> dict[str, dict[str, float | None]]:
        """Aggregate metrics per method (None where not computable; see :meth:`reasons`)."""
        results: dict[str, dict[str, float | None]] = {}
        for method in methods:
            values: dict[str, float | None] = {}
            for metric, component in METRICS.items():
                if component not in self.enabled:
                    continue
                if metric == "fid" and "fid" in self.networks:
                    values[metric] = self._frechet(self.networks["fid"], method)
                elif metric == "fvd" and "fvd" in self.networks:
                    values[metric] = self._frechet(self.networks["fvd"], method)
                else:
                    count = self._counts[method].get(metric, 0)
                    values[metric] = self._sums[method][metric] / count if count else None
            results[method] = values
        return results

    @staticmethod
    def _frechet(metric: FrechetInceptionDistance | FrechetVideoDistance, method: str) -> float | None:
        try:
            return metric.compute(method)
        except ValueError:
            return None

    def reasons(self) -> dict[str, str]:
        """Metric -> why it is unavailable for every clip (missing weights, no landmarker, too few windows, left
        out of every clip)."""
        reasons = {}
        for metric, component in METRICS.items():
            if component in self.unavailable:
                reasons[metric] = self.unavailable[component]
            elif component in self.components and self.left_out.get(metric) and not any(
                    self._counts[method].get(metric) for method in self._counts) and metric not in ("fid", "fvd"):
                clips = self.left_out[metric]
                reasons[metric] = "not scored on any clip (" + "; ".join(
                    f"{clip}: {why}" for clip, why in list(clips.items())[:5]) + (" ..." if len(clips) > 5 else "") + ")"
        fvd = self.networks.get("fvd")
        if fvd is not None and fvd.sets.count("reference") < 2:
            reasons["fvd"] = (f"{fvd.sets.count('reference')} clip window(s) of {self.protocol.get('fvd', {}).get('clip_frames', 16)} "
                              "frames; FVD needs 2 or more (longer clips or more clips_per_video)")
        return reasons


def _landmarker_path(path: str | None, download: bool) -> str:
    from aniportrait.face.landmarks import resolve_landmarker_model

    try:
        return str(resolve_landmarker_model(path, download=download))
    except AniPortraitError as error:
        raise MetricUnavailable(f"no MediaPipe face landmarker: set metrics.face_landmarker=PATH to a face_landmarker "
                                f".task file ({error})") from error

