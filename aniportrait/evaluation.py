"""``evaluate.py``: score a bundle on a dataset split.

Stage A (audio -> landmarks) protocol, per test clip: the speech of the whole clip drives the bundle's
Audio2Mesh from the clip's reference mesh (the same ``mesh_reference`` rule as in training) and its
Audio2Pose from the clip's first frame; predictions are compared with the clip's ground truth at the
bundle's frame rate. Reported: LVE and mean vertex error (cm), mouth-opening correlation (pooled over all
frames, and the mean per clip), pose L1 (degrees / cm, free-running decoding). Results: a JSON file
(metrics, per-clip rows, the protocol), a per-clip CSV, and a Markdown table on stdout.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from aniportrait.audio.io import load_audio
from aniportrait.bundle import Bundle, git_sha
from aniportrait.data.audio_windows import load_clip_arrays
from aniportrait.data.clip import Manifest
from aniportrait.errors import AniPortraitError
from aniportrait.face.geometry import relative_pose6
from aniportrait.inference import resolve_device
from aniportrait.metrics.landmarks import lip_vertex_error, mean_vertex_error, mouth_opening, pearson, pose_l1
from aniportrait.pipelines.landmarks import AudioToLandmarks
from aniportrait.utils.atomic import atomic_path

__all__ = ["evaluate", "evaluate_landmarks"]

log = logging.getLogger(__name__)


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


def evaluate(cfg: DictConfig) -> float | None:
    if not cfg.get("bundle"):
        raise AniPortraitError("no bundle given: add bundle=PATH (or set ANIPORTRAIT_BUNDLE)")
    bundle = Bundle.open(cfg.bundle)
    root = hydra.utils.instantiate(cfg.data).resolve()
    device = resolve_device(cfg.get("device"))
    if not bundle.has("audio2mesh"):
        bundle.require("audio2mesh", purpose="the landmark benchmark")
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
