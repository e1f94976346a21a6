"""``evaluate.py``: the benchmark. One written-down protocol, any method's videos, every metric.

Modes (conf/evaluate.yaml, protocol from conf/protocol/, metric weights from conf/metrics/):

* ``python evaluate.py generated=DIR data=ROOT``: score ``DIR/<clip id>.mp4`` of every selected test clip
  against the clip's ground truth under ``protocol`` (default: conf/protocol/default.yaml).
* ``python evaluate.py bundle=B data=ROOT protocol=self_reenactment|audio_driven``: generate the test clips
  with the bundle's stage-B pipeline (reference = the clip's reference frame; driver = the ground-truth
  landmarks, or the clip's speech through the bundle's stage A), write them to ``<output_dir>/generated``,
  and score that directory the same way.
* ``python evaluate.py bundle=B data=ROOT`` (protocol ``default``, no ``generated``): the stage-A landmark
  benchmark (LVE, mean vertex error, mouth-opening correlation, pose L1) of the bundle's Audio2Mesh/Pose.

Alignment rule (``ALIGNMENT_RULE``, written into every result): see :func:`align_videos`.

Results in ``output_dir``: metrics.json (protocol, metric versions and weights, aggregate metrics per method,
per-clip rows, missing and unreadable clips, reasons for unavailable metrics), clips.csv, plots/*.png, a
Markdown table on stdout; with ``logger=wandb`` also wandb tables. Sanity rows: ``ground_truth`` (the
ground truth scored against itself: the best a metric can say) and ``copy_reference`` (the reference frame
repeated, with the clip's speech: a method that does not animate).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from aniportrait.audio.io import SAMPLE_RATE, load_audio
from aniportrait.bundle import Bundle, git_sha
from aniportrait.data.audio_windows import load_clip_arrays
from aniportrait.data.clip import ClipRecord, Manifest, load_landmarks
from aniportrait.data.video import probe_video, read_video, write_video
from aniportrait.errors import AniPortraitError
from aniportrait.face.geometry import relative_pose6
from aniportrait.inference import build_sampling_scheduler, resolve_device
from aniportrait.inference.options import bundle_context_frames, parse_context_frames
from aniportrait.metrics.landmarks import lip_vertex_error, mean_vertex_error, mouth_opening, pearson, pose_l1
from aniportrait.metrics.suite import (
    HIGHER_IS_BETTER,
    METRICS,
    REFERENCE_VALUED,
    ClipPair,
    MetricSuite,
    VideoSample,
    copy_reference_sample,
    prepare_sample,
)
from aniportrait.metrics.sync import resample_indices
from aniportrait.pipelines.landmarks import AudioToLandmarks, render_pose_images
from aniportrait.utils import values as check
from aniportrait.utils.atomic import atomic_path
from aniportrait.utils.outputs import Overwrite, check_outputs

__all__ = [
    "evaluate",
    "evaluate_landmarks",
    "evaluate_videos",
    "generate_test_videos",
    "align_videos",
    "select_clips",
    "write_results",
    "ALIGNMENT_RULE",
    "GENERATION_PROTOCOLS",
]

log = logging.getLogger(__name__)

GENERATION_PROTOCOLS = ("self_reenactment", "audio_driven")
SANITY_METHODS = ("ground_truth", "copy_reference")
ALIGNMENT_RULE = (
    "frame rate: both videos are brought to protocol.fps (null: the ground truth's) by taking, for every output "
    "frame, the source frame nearest in time; length: the first min(generated, ground truth) frames are scored "
    "(and at most protocol.frames_per_clip); size: a generated video of another aspect ratio is centre-cropped "
    "to the ground truth's, then both are resized (INTER_AREA shrinking, INTER_CUBIC enlarging) to "
    "protocol.resolution x protocol.resolution (null: the ground truth's size); audio: the generated file's own "
    "track (protocol.sync.audio=video) or the clip's audio.wav (=clip), cut to the scored duration; a video "
    "without audio has no sync scores. Every change is listed in the clip's 'alignment' column."
)


def evaluate_landmarks(bundle: Bundle, root: Path, split: str, device: torch.device) -> dict:
    """Stage-A metrics of ``bundle`` on one split of the clip dataset at ``root``."""
    model = AudioToLandmarks.from_bundle(bundle, device)
    settings = bundle.settings.get("audio", {})
    records = [r for r in Manifest.load(root).split(split) if r.audio is not None]
    if not records:
        raise AniPortraitError(f"{root}: split {split!r} has no clips with audio to evaluate")
    rows, pooled_pred, pooled_true = [], [], []
    for record in tqdm(records, desc=f"evaluate {split}", unit="clip"):
        clip = load_clip_arrays(root, record, model.fps, settings.get("mesh_reference", "neutral"))
        audio = load_audio(root / record.audio)
        prediction = model.predict(audio, clip.mesh3d[clip.reference_index], identity=record.identity
                                   if record.identity in settings.get("pose", {}).get("identities", {}) else None,
                                   num_frames=clip.frames)
        valid = clip.valid
        pred_mesh, true_mesh = torch.from_numpy(prediction.meshes), torch.from_numpy(clip.mesh3d)
        pred_open, true_open = mouth_opening(prediction.meshes)[valid], mouth_opening(clip.mesh3d)[valid]
        pooled_pred.append(pred_open)
        pooled_true.append(true_open)
        row = {
            "clip": record.id,
            "frames": int(valid.sum()),
            "lve": float(lip_vertex_error(pred_mesh, true_mesh, valid)),
            "mve": float(mean_vertex_error(pred_mesh, true_mesh, valid)),
            "mouth_open_corr": pearson(pred_open, true_open),
        }
        if model.audio2pose is not None:
            first = int(np.argmax(valid))
            true_poses = relative_pose6(clip.trans_mat, clip.trans_mat[first])
            row["pose_l1"] = float(pose_l1(torch.from_numpy(prediction.poses[first:]), torch.from_numpy(true_poses[first:]),
                                           valid[first:]))
        rows.append(row)
    weights = np.array([row["frames"] for row in rows], dtype=np.float64)
    metrics = {key: float(np.average([row[key] for row in rows], weights=weights))
               for key in ("lve", "mve", "pose_l1") if key in rows[0]}
    metrics["mouth_open_corr"] = pearson(np.concatenate(pooled_pred), np.concatenate(pooled_true))
    metrics["mouth_open_corr_per_clip"] = float(np.mean([row["mouth_open_corr"] for row in rows]))
    protocol = {"stage": "audio_to_landmarks", "split": split, "clips": len(rows), "frames": int(weights.sum()),
                "fps": model.fps, "mesh_reference": settings.get("mesh_reference", "neutral"),
                "pose_relative_to": "first valid frame of the clip", "units": "cm (meshes), degrees/cm (poses)"}
    return {"metrics": metrics, "clips": rows, "protocol": protocol}



def _markdown(metrics: dict) -> str:
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in metrics.items()]
    return "\n".join(lines)


# -- video benchmark: clips, alignment, loading -------------------------------------------------------------


def select_clips(records: list[ClipRecord], count: int | None, seed: int) -> list[ClipRecord]:
    """``count`` clips drawn with ``seed`` (all when None), kept in manifest order."""
    if count is None or count >= len(records):
        return list(records)
    chosen = np.random.default_rng(seed).choice(len(records), size=int(count), replace=False)
    return [records[index] for index in sorted(chosen)]


def _resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(T, h, w, 3) -> (T, height, width, 3): INTER_AREA when shrinking, INTER_CUBIC when enlarging."""
    if frames.shape[1:3] == (height, width):
        return frames
    interpolation = cv2.INTER_AREA if frames.shape[1] * frames.shape[2] > height * width else cv2.INTER_CUBIC
    return np.stack([cv2.resize(frame, (width, height), interpolation=interpolation) for frame in frames])


def _centre_crop_to_aspect(frames: np.ndarray, aspect: float) -> np.ndarray:
    """Crop (T, h, w, 3) around its centre to width / height == ``aspect``."""
    height, width = frames.shape[1:3]
    if abs(width / height - aspect) < 1e-3:
        return frames
    if width / height > aspect:
        new_width = round(height * aspect)
        left = (width - new_width) // 2
        return frames[:, :, left : left + new_width]
    new_height = round(width / aspect)
    top = (height - new_height) // 2
    return frames[:, top : top + new_height]


def align_videos(reference: np.ndarray, reference_fps: float, generated: np.ndarray | None, generated_fps: float | None,
                 protocol: dict) -> tuple[np.ndarray, np.ndarray | None, float, dict[str, str]]:
    """Make a generated video comparable with its ground truth, frame for frame (:data:`ALIGNMENT_RULE`).

    Returns (reference, generated, fps, notes); notes say what was changed, keyed by what.
    """
    notes: dict[str, str] = {}
    fps = float(protocol.get("fps") or reference_fps)
    if abs(fps - reference_fps) > 1e-3 * fps:
        reference = reference[resample_indices(len(reference), reference_fps, fps)]
        notes["reference_fps"] = f"{reference_fps:g} -> {fps:g} fps"
    if generated is not None and abs(generated_fps - fps) > 1e-3 * fps:
        notes["fps"] = f"generated {generated_fps:g} fps -> {fps:g} fps ({len(generated)} -> "
        generated = generated[resample_indices(len(generated), generated_fps, fps)]
        notes["fps"] += f"{len(generated)} frames)"
    length = len(reference) if generated is None else min(len(reference), len(generated))
    if generated is not None and len(generated) != len(reference):
        notes["length"] = f"generated {len(generated)} frames, ground truth {len(reference)}: first {length} scored"
    limit = protocol.get("frames_per_clip")
    if limit and length > int(limit):
        length = int(limit)
    reference = reference[:length]
    height, width = reference.shape[1:3]
    if protocol.get("resolution"):
        height = width = int(protocol["resolution"])
    if reference.shape[1:3] != (height, width):
        notes["reference_size"] = f"{reference.shape[2]}x{reference.shape[1]} -> {width}x{height}"
        reference = _resize(reference, height, width)
    if generated is not None:
        generated = generated[:length]
        if generated.shape[1:3] != (height, width):
            original = f"{generated.shape[2]}x{generated.shape[1]}"
            generated = _resize(_centre_crop_to_aspect(generated, width / height), height, width)
            notes["size"] = f"generated {original} -> {width}x{height}"
    return reference, generated, fps, notes


def _cut_audio(audio: np.ndarray | None, frames: int, fps: float) -> np.ndarray | None:
    return None if audio is None else audio[: round(frames / fps * SAMPLE_RATE)]


class ClipPairDataset(torch.utils.data.Dataset):
    """Loads, aligns and prepares (landmarks, sync crops) one clip per item: the CPU half of the benchmark.

    ``generated_for(record)``: the generated video file of a clip (it may not exist).
    """

    def __init__(self, root: Path, records: list[ClipRecord], generated_for: Callable[[ClipRecord], Path],
                 protocol: dict, landmarker_model: str | None, components: set[str]):
        self.root, self.records, self.generated_for = root, records, generated_for
        self.protocol, self.landmarker_model = protocol, landmarker_model
        self.settings = {**protocol.get("sync", {}), "components": components}

    def __len__(self) -> int:
        return len(self.records)

    def _load_generated(self, path: Path) -> tuple[np.ndarray | None, float | None, np.ndarray | None, str, str | None]:
        """(frames, fps, audio, status, audio problem) of a generated video; status "ok", "missing" or "corrupt: why"."""
        if not path.is_file():
            return None, None, None, "missing", None
        try:
            info = probe_video(path)
            frames = read_video(path)
            if len(frames) == 0:
                raise AniPortraitError(f"{path} has no frames")
        except AniPortraitError as error:
            return None, None, None, f"corrupt: {error}", None
        if not info.has_audio:
            return frames, info.fps, None, "ok", "the generated video has no audio track"
        try:
            return frames, info.fps, load_audio(path), "ok", None
        except AniPortraitError as error:  # an empty or broken audio track costs the sync scores only
            return frames, info.fps, None, "ok", f"unreadable audio track ({error})"

    def __getitem__(self, index: int) -> ClipPair:
        record = self.records[index]
        pair = ClipPair(record.id, None)
        generated, generated_fps, generated_audio, status, audio_problem = self._load_generated(self.generated_for(record))
        try:
            reference = read_video(self.root / record.video)
            reference_audio = load_audio(self.root / record.audio) if record.audio else None
            clip_lmks = load_landmarks(self.root / record.landmarks)["lmks"]
        except AniPortraitError as error:
            pair.status = {method: f"ground truth unreadable: {error}" for method in ("generated", *self._sanity())}
            return pair
        reference, generated, fps, pair.alignment = align_videos(reference, record.fps, generated, generated_fps,
                                                                 self.protocol)
        if fps != record.fps:
            clip_lmks = clip_lmks[resample_indices(len(clip_lmks), record.fps, fps)]
        still_index = min(int(self.protocol.get("reference_frame", 0)), len(reference) - 1)
        still = (reference[still_index : still_index + 1], clip_lmks[still_index : still_index + 1])
        start = min(int(self.protocol.get("score_from") or 0), len(reference) - 1)
        if start:  # e.g. the reference frame itself, which copying reproduces perfectly
            reference, clip_lmks = reference[start:], clip_lmks[start:]
            generated = None if generated is None else generated[start:]
            reference_audio = None if reference_audio is None else reference_audio[round(start / fps * SAMPLE_RATE):]
            generated_audio = None if generated_audio is None else generated_audio[round(start / fps * SAMPLE_RATE):]
            pair.alignment["score_from"] = f"frames before {start} not scored"
        count = len(reference)
        pair.reference = prepare_sample(
            VideoSample(torch.from_numpy(np.ascontiguousarray(reference)), fps, _cut_audio(reference_audio, count, fps)),
            self.settings, self.landmarker_model, clip_lmks)
        pair.status["generated"] = status
        if generated is not None:
            own_audio = self.settings.get("audio", "video") == "video"
            audio = generated_audio if own_audio else reference_audio
            sample = VideoSample(torch.from_numpy(np.ascontiguousarray(generated)), fps, _cut_audio(audio, count, fps))
            if own_audio and audio_problem:
                sample.notes["sync"] = audio_problem
            pair.methods["generated"] = prepare_sample(sample, self.settings, self.landmarker_model, clip_lmks)
        if self._sanity():
            pair.methods["ground_truth"] = pair.reference
            if start > still_index:  # the reference frame was cut from the scored range: find its landmarks alone
                source = prepare_sample(VideoSample(torch.from_numpy(np.ascontiguousarray(still[0])), fps, None),
                                        {**self.settings, "components": self.settings["components"] - {"sync"}},
                                        self.landmarker_model, still[1])
                source_frame, source_lmks = 0, still[1]
            else:
                source, source_frame, source_lmks = pair.reference, still_index - start, clip_lmks
            pair.methods["copy_reference"] = copy_reference_sample(
                source, source_frame, self.settings, self.landmarker_model is not None, source_lmks, count=count,
                audio=pair.reference.audio)
            pair.status.update({method: "ok" for method in SANITY_METHODS})
        return pair

    def _sanity(self) -> tuple[str, ...]:
        return SANITY_METHODS if self.protocol.get("sanity", True) else ()


def _single(item):
    return item


def _one_cv2_thread(worker: int) -> None:
    """Loader workers run side by side: OpenCV's own thread pool in each would only oversubscribe the cores."""
    cv2.setNumThreads(1)


def evaluate_videos(root: Path, records: list[ClipRecord], generated_for: Callable[[ClipRecord], Path],
                    suite: MetricSuite, protocol: dict, num_workers: int = 0) -> dict[str, Any]:
    """Score the generated video of every record (and the sanity rows) with ``suite``; the results dict."""
    dataset = ClipPairDataset(root, records, generated_for, protocol, suite.landmarker_model, suite.components)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_single,
                                         prefetch_factor=2 if num_workers else None, worker_init_fn=_one_cv2_thread)
    rows, alignment = [], {}
    started = waited = time.perf_counter()
    waiting = 0.0
    for pair in tqdm(loader, total=len(records), desc="score clips", unit="clip"):
        waiting += time.perf_counter() - waited
        rows += suite.score(pair)
        if pair.alignment:
            alignment[pair.clip_id] = pair.alignment
        waited = time.perf_counter()
    for row in rows:
        if row["method"] == "generated" and row["clip"] in alignment:
            row["alignment"] = "; ".join(f"{key}: {value}" for key, value in alignment[row["clip"]].items())
    methods = ["generated", *(SANITY_METHODS if protocol.get("sanity", True) else ())]
    generated_rows = [row for row in rows if row["method"] == "generated"]
    summary_started = time.perf_counter()
    summary = suite.summary(methods)
    timing = {"total_s": time.perf_counter() - started, "waiting_for_clips_s": waiting,
              "frechet_distances_s": time.perf_counter() - summary_started,
              "per_metric_s": dict(suite.timings), "workers": num_workers}
    results = {
        "metrics": summary,
        "unavailable": suite.reasons(),
        "clips": rows,
        "scored": [row["clip"] for row in generated_rows if row["status"] == "ok"],
        "missing": [row["clip"] for row in generated_rows if row["status"] == "missing"],
        "unreadable": {row["clip"]: row["status"] for row in generated_rows if row["status"] not in ("ok", "missing")},
        "left_out": {metric: dict(clips) for metric, clips in suite.left_out.items() if clips},
        "fvd_windows": suite.fvd_windows,
        "timing": timing,
    }
    if not results["scored"]:
        reasons = "; ".join(f"{row['clip']}: {row['status']}" for row in generated_rows[:5])
        more = f" (and {len(generated_rows) - 5} more)" if len(generated_rows) > 5 else ""
        raise AniPortraitError(f"nothing could be scored: none of the {len(records)} clips has a usable generated "
                               f"video ({reasons}{more}); give videos named <clip id>.mp4 that decode")
    return results


# -- outputs ----------------------------------------------------------------------------------------------

_METHOD_TITLES = {"generated": "generated", "ground_truth": "ground truth vs itself", "copy_reference": "copy reference frame"}


def _format(value: float | None) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.4f}"


def markdown_table(results: dict[str, Any]) -> str:
    """Metrics as rows, methods as columns; n/a cells explained below the table."""
    methods = list(results["metrics"])
    metric_names = [name for name in METRICS if any(name in results["metrics"][m] for m in methods)]
    lines = ["| metric | " + " | ".join(_METHOD_TITLES.get(m, m) for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    for name in metric_names:
        arrow = "" if name in REFERENCE_VALUED else (" ↑" if HIGHER_IS_BETTER[name] else " ↓")
        cells = [_format(results["metrics"][m].get(name)) for m in methods]
        lines.append(f"| {name}{arrow} | " + " | ".join(cells) + " |")
    for name, reason in results["unavailable"].items():
        if name in metric_names:
            lines.append(f"\nn/a {name}: {reason}")
    summary = f"\nclips: {len(results['scored'])} scored"
    if results["missing"]:
        summary += f", {len(results['missing'])} missing ({', '.join(results['missing'])})"
    if results["unreadable"]:
        summary += f", {len(results['unreadable'])} unreadable ({', '.join(results['unreadable'])})"
    lines.append(summary + " (every row covers the scored clips only)")
    scored = set(results["scored"])
    for name, clips in results.get("left_out", {}).items():
        among = {clip: why for clip, why in clips.items() if clip in scored}
        if among and name in metric_names and name not in results["unavailable"]:
            shown = "; ".join(f"{clip}: {why}" for clip, why in list(among.items())[:3])
            lines.append(f"{name}: {len(among)} of {len(scored)} scored clips in no row's average ({shown}"
                         f"{' ...' if len(among) > 3 else ''})")
    return "\n".join(lines)


def _json_safe(value):
    """JSON has no inf/nan: write them as strings so every reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.integer | np.floating):
        return _json_safe(value.item())
    return value


def _plot(results: dict[str, Any], plot_dir: Path) -> list[Path]:
    """Distributions of the per-clip metrics per method, and per-clip bars: PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in results["clips"] if row["status"] == "ok"]
    methods = list(results["metrics"])
    names = [name for name in METRICS if name not in ("fid", "fvd")
             and any(isinstance(row.get(name), float) and math.isfinite(row[name]) for row in rows)]
    if not names:
        return []
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    columns = min(4, len(names))
    grid = (math.ceil(len(names) / columns), columns)

    figure, axes = plt.subplots(*grid, figsize=(4 * grid[1], 3.2 * grid[0]), squeeze=False)
    for axis, name in zip(axes.flat, names):
        data = [[row[name] for row in rows if row["method"] == m and isinstance(row.get(name), float)
                 and math.isfinite(row[name])] for m in methods]
        kept = [(m, values) for m, values in zip(methods, data) if values]
        axis.boxplot([values for _, values in kept], showmeans=True)
        axis.set_xticks(range(1, len(kept) + 1), [_METHOD_TITLES.get(m, m).replace(" ", "\n", 1) for m, _ in kept],
                        fontsize=7)
        axis.set_title(f"{name} per clip")
    for axis in list(axes.flat)[len(names):]:
        axis.set_visible(False)
    figure.tight_layout()
    paths.append(plot_dir / "metric_distributions.png")
    figure.savefig(paths[-1], dpi=100)
    plt.close(figure)

    clips = sorted({row["clip"] for row in rows})
    figure, axes = plt.subplots(len(names), 1, squeeze=False,
                                figsize=(min(40, max(6, 0.35 * len(clips) * len(methods))), 2.4 * len(names)))
    width = 0.8 / len(methods)
    for axis, name in zip(axes[:, 0], names):
        for offset, method in enumerate(methods):
            values = {row["clip"]: row.get(name) for row in rows if row["method"] == method}
            heights = [values.get(clip) if isinstance(values.get(clip), float) and math.isfinite(values[clip]) else 0.0
                       for clip in clips]
            axis.bar(np.arange(len(clips)) + offset * width, heights, width, label=_METHOD_TITLES.get(method, method))
        axis.set_ylabel(name)
        axis.set_xticks(np.arange(len(clips)) + 0.4 - width / 2, clips, rotation=90, fontsize=6)
    axes[0, 0].legend(fontsize=7)
    figure.tight_layout()
    paths.append(plot_dir / "per_clip.png")
    figure.savefig(paths[-1], dpi=100)
    plt.close(figure)
    return paths


def _log_to_loggers(cfg: DictConfig, results: dict[str, Any], columns: list[str]) -> None:
    """``logger=...``: aggregate metrics to every logger, the tables to wandb."""
    if not cfg.get("logger"):
        return
    import pytorch_lightning as pl

    loggers = [hydra.utils.instantiate(entry) for entry in cfg.logger.values() if entry and "_target_" in entry]
    try:
        for logger in loggers:
            flat = {f"{method}/{name}": value for method, values in results["metrics"].items()
                    for name, value in values.items() if value is not None and math.isfinite(value)}
            logger.log_metrics(flat)
            if isinstance(logger, pl.loggers.WandbLogger):
                methods = list(results["metrics"])
                summary = [[name, *[results["metrics"][m].get(name) for m in methods]] for name in METRICS
                           if any(name in results["metrics"][m] for m in methods)]
                logger.log_table("evaluation/summary", columns=["metric", *methods], data=summary)
                logger.log_table("evaluation/clips", columns=columns,
                                 data=[[row.get(column) for column in columns] for row in results["clips"]])
    finally:
        for logger in loggers:
            logger.finalize("success")
            if isinstance(logger, pl.loggers.WandbLogger):
                import wandb

                wandb.finish()


def write_results(results: dict[str, Any], out_dir: Path, cfg: DictConfig | None = None) -> Path:
    """metrics.json, clips.csv and plots/ in ``out_dir`` (atomic writes); tables to the configured loggers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["clip", "method", "status", "frames", *METRICS, "alignment", "notes"]
    columns = [c for c in columns if c in ("clip", "method", "status") or any(c in row for row in results["clips"])]
    results["plots"] = [str(path) for path in _plot(results, out_dir / "plots")]
    with atomic_path(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(_json_safe(results), indent=2))
    with atomic_path(out_dir / "clips.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["clips"])
    if cfg is not None:
        _log_to_loggers(cfg, results, columns)
    return out_dir / "metrics.json"


# -- generation protocols (issue 5's pose-to-video pipeline) -------------------------------------------------


def _pose_images(lmks: np.ndarray, height: int, width: int) -> np.ndarray:
    """(T, 478, 3) normalised landmarks -> (T, height, width, 3) pose images, drawn as training draws them."""
    from aniportrait.face.drawing import draw_landmarks

    return np.stack([draw_landmarks(points, image_size=(height, width), normalized=True) for points in lmks])


def generate_test_videos(bundle: Bundle, root: Path, records: list[ClipRecord], protocol: dict, device: torch.device,
                         out_dir: Path) -> Path:
    """Generate ``out_dir/<clip id>.mp4`` for every record under a generation protocol; returns ``out_dir``.

    self_reenactment: reference image = the clip's frame ``reference_frame``; pose images = the clip's own
    ground-truth landmarks. audio_driven: the same reference; pose images = the bundle's stage A driven by
    the clip's audio from the reference frame's mesh and camera (Audio2Pose poses when the bundle has it,
    else the reference pose held). Each video gets the clip's audio, the clip's fps, and
    ``protocol.frames_per_clip`` frames at most; seeds are ``generation.seed`` for every clip.
    """
    from aniportrait.pipelines.ablation import ablated
    from aniportrait.pipelines.pose2video import Pose2VideoPipeline

    name, generation = protocol["name"], protocol.get("generation", {})
    pipeline = Pose2VideoPipeline.from_bundle(bundle, device, distilled=bool(generation.get("distilled")))
    if generation.get("scheduler"):  # settings of the bundle's sampling scheduler changed
        pipeline.scheduler = build_sampling_scheduler({"_target_": type(pipeline.scheduler).__name__,
                                                       **generation["scheduler"]}, pipeline.scheduler,
                                                      key="protocol.generation.scheduler")
    ablations = list(generation.get("ablate") or [])
    settings = pipeline.video_settings
    landmarks_model = AudioToLandmarks.from_bundle(bundle, device) if name == "audio_driven" else None
    out_dir.mkdir(parents=True, exist_ok=True)
    reference_frame = int(protocol.get("reference_frame", 0))
    for record in tqdm(records, desc=f"generate ({name})", unit="clip"):
        frames = read_video(root / record.video)
        arrays = load_landmarks(root / record.landmarks, frames=record.frames)
        count = min(len(frames), int(protocol.get("frames_per_clip") or len(frames)))
        audio = load_audio(root / record.audio) if record.audio else None
        height, width = frames.shape[1:3]
        if name == "self_reenactment":
            pose_images = _pose_images(arrays["lmks"][:count], height, width)
        else:
            landmarks_model.fps = record.fps
            prediction = landmarks_model.predict(audio, arrays["mesh3d"][reference_frame], num_frames=count)
            poses = prediction.poses if landmarks_model.audio2pose is not None else None
            _, pose_images = render_pose_images(prediction.meshes, arrays["trans_mat"][reference_frame].astype(np.float64),
                                                poses, (height, width))
        size_h = int(generation.get("height") or settings.get("height") or height)
        size_w = int(generation.get("width") or settings.get("width") or width)
        with ablated(pipeline, *ablations):
            video = pipeline(
                frames[reference_frame], pose_images,
                reference_pose=_pose_images(arrays["lmks"][reference_frame : reference_frame + 1], height, width)[0],
                num_inference_steps=int(generation.get("steps") or settings.get("num_inference_steps", 25)),
                guidance_scale=float(generation.get("guidance_scale") or settings.get("guidance_scale", 3.5)),
                context_frames=parse_context_frames(generation["context_frames"], "protocol.generation.context_frames")
                if generation.get("context_frames") else bundle_context_frames(settings, pipeline.preset.name),
                context_overlap=int(settings.get("context_overlap", 4)),
                generator=torch.Generator(device=device).manual_seed(int(generation.get("seed", 0))),
                width=size_w, height=size_h, progress=False,
                deep_cache_interval=int(generation.get("deep_cache_interval") or 1))
        write_video(out_dir / f"{record.id}.mp4", video, record.fps, audio=_cut_audio(audio, count, record.fps))
    return out_dir


# -- entry ------------------------------------------------------------------------------------------------


def _records(root: Path, split: str) -> list[ClipRecord]:
    records = Manifest.load(root).split(split)
    if not records:
        raise AniPortraitError(f"{root}: split {split!r} has no clips; choose another split= or prepare the dataset")
    return records


def _check_generated_names(generated_dir: Path, records: list[ClipRecord]) -> None:
    """Before any metric network loads: the folder must hold a video for at least one selected clip."""
    if any((generated_dir / f"{record.id}.mp4").is_file() for record in records):
        return
    present = sorted(path.name for path in generated_dir.iterdir())[:5]
    raise AniPortraitError(f"generated={generated_dir} holds no video of the {len(records)} selected clips (expected "
                           f"names like {records[0].id}.mp4; the folder has {', '.join(present) or 'nothing'}); "
                           "name each video <clip id>.mp4, or choose the split= the videos were made for")


def _run_video_benchmark(cfg: DictConfig, root: Path, device: torch.device, generated_dir: Path, mode: str,
                         records: list[ClipRecord], protocol: dict, **provenance: str) -> dict[str, Any]:
    metrics_cfg = OmegaConf.to_container(cfg.metrics, resolve=True)
    suite = MetricSuite.from_config(metrics_cfg, protocol, device)
    results = evaluate_videos(root, records, lambda record: generated_dir / f"{record.id}.mp4", suite, protocol,
                              int(cfg.get("num_workers", 0)))
    results["protocol"] = {
        **protocol, "mode": mode, "split": cfg.split, "dataset": str(root), "generated_dir": str(generated_dir),
        "clips_selected": [record.id for record in records], "alignment_rule": ALIGNMENT_RULE,
        "aggregation": "per-frame metrics: mean over all scored frames; LSE-D/C, AV offset: mean over clips; "
                       "FID: all scored frames (every fid.frame_stride-th) pooled; FVD: all windows pooled; every "
                       "row (the ground-truth set of FID/FVD too) covers the same clips: those whose generated "
                       "video could be scored, and per metric those where every row has the metric ('left_out' "
                       "says which clips were left out of which metric, and why)",
        "versions": suite.versions(), "metrics_config": metrics_cfg, "device": str(device), "git_sha": git_sha(),
        **provenance,
    }
    out_dir = Path(cfg.output_dir)
    path = write_results(results, out_dir, cfg)
    print(markdown_table(results))
    print(f"results: {path}")
    return results


def _check_settings(cfg: DictConfig, protocol: dict) -> None:
    """The numbers of the protocol and the run, checked before any clip or network is loaded."""
    check.integer("num_workers", cfg.get("num_workers", 0), minimum=0)
    for key, minimum in (("clips", 1), ("frames_per_clip", 1), ("resolution", 8)):
        if protocol.get(key) is not None:
            check.integer(f"protocol.{key}", protocol[key], minimum=minimum, hint=" (or null: all)")
    if protocol.get("fps") is not None:
        check.number("protocol.fps", protocol["fps"], minimum=0, exclusive_minimum=True, hint=" (or null)")
    check.integer("protocol.reference_frame", protocol.get("reference_frame", 0), minimum=0)
    for section, key in (("fid", "frame_stride"), ("fvd", "clip_frames"), ("fvd", "frame_stride"),
                         ("fvd", "clips_per_video")):
        if key in protocol.get(section, {}):
            check.integer(f"protocol.{section}.{key}", protocol[section][key], minimum=1)


def evaluate(cfg: DictConfig) -> float | None:
    """Dispatch on the inputs: generated=DIR, a generation protocol, or the stage-A benchmark."""
    out_dir = Path(cfg.output_dir)
    names = ["metrics.json", "clips.csv"]
    if not cfg.get("generated") and (cfg.get("protocol") or {}).get("name") in GENERATION_PROTOCOLS:
        names.append("generated")  # generate_test_videos writes <output_dir>/generated/<clip id>.mp4
    check_outputs({f"output_dir/{name}": out_dir / name for name in names}, {"generated": cfg.get("generated")},
                  Overwrite(bool(cfg.get("overwrite")), "overwrite=true"))
    protocol = OmegaConf.to_container(cfg.protocol, resolve=True)
    _check_settings(cfg, protocol)
    root = hydra.utils.instantiate(cfg.data).resolve()
    device = resolve_device(cfg.get("device"))
    name = protocol.get("name", "default")
    if cfg.get("generated"):
        generated_dir = Path(str(cfg.generated)).expanduser()
        if not generated_dir.is_dir():
            raise AniPortraitError(f"generated={generated_dir} is not a folder; give the folder holding <clip id>.mp4 files")
        records = select_clips(_records(root, cfg.split), protocol.get("clips"), int(protocol.get("seed", 0)))
        _check_generated_names(generated_dir, records)
        results = _run_video_benchmark(cfg, root, device, generated_dir.resolve(), "generated", records, protocol)
        return results["metrics"]["generated"].get("fvd")
    if not cfg.get("bundle"):
        raise AniPortraitError("nothing to score: add generated=DIR (videos named <clip id>.mp4) or bundle=PATH "
                               "(or set ANIPORTRAIT_BUNDLE)")
    bundle = Bundle.open(cfg.bundle)
    if name in GENERATION_PROTOCOLS:
        bundle.require("reference_unet", "denoising_unet", "pose_guider", purpose=f"protocol={name}")
        if name == "audio_driven":
            bundle.require("audio2mesh", purpose="protocol=audio_driven")
        records = select_clips(_records(root, cfg.split), protocol.get("clips"), int(protocol.get("seed", 0)))
        silent = [record.id for record in records if record.audio is None]
        if name == "audio_driven" and silent:
            raise AniPortraitError(f"protocol=audio_driven needs speech, but test clips {silent[:5]} have no audio; "
                                   "use protocol=self_reenactment or a dataset with audio")
        generated_dir = generate_test_videos(bundle, root, records, protocol, device, Path(cfg.output_dir) / "generated")
        results = _run_video_benchmark(cfg, root, device, generated_dir, name, records, protocol, bundle=str(bundle.path))
        return results["metrics"]["generated"].get("fvd")
    if not bundle.has("audio2mesh"):
        bundle.require("audio2mesh", purpose="the landmark benchmark (or choose protocol=self_reenactment|audio_driven)")
    results = evaluate_landmarks(bundle, root, cfg.split, device)
    results["protocol"].update({"bundle": str(bundle.path), "dataset": str(root), "git_sha": git_sha()})
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    with atomic_path(out_dir / "clips.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(results["clips"][0]))
        writer.writeheader()
        writer.writerows(results["clips"])
    print(_markdown(results["metrics"]))
    print(f"results: {out_dir / 'metrics.json'}")
    return results["metrics"].get("mouth_open_corr")
