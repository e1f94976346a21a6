"""Seams at context-window borders: how much the frames jump where the windows that denoise them change, for each
sampling preset (official: the uniform schedule's equal averaging; project: linear-ramp blending).

One video is generated per preset from the same bundle, reference, poses and seed, as one sequence of context
windows (no streaming chunks). The frame-difference profile d[t] = mean |frame[t+1] - frame[t]| (uint8 levels,
all pixels and channels) is split into border transitions (t -> t+1 where the set of windows holding the frame
changes) and interior ones. A seam shows as borders that differ more than the interior: ``seam_ratio`` = mean d at
borders / median d inside, and ``border_excess`` = mean over borders of d[t] - (d[t-1] + d[t+1]) / 2 (a jump
against the local motion). ``--still`` holds the first pose, so only seams (and the model's own flicker) move.

    python benchmarks/window_seams.py --bundle BUNDLE                     # a synthetic talking head, 64 frames
    python benchmarks/window_seams.py --bundle B --reference clip/landmarks.npz --poses clip/landmarks.npz --still
    python benchmarks/window_seams.py --bundle B --output benchmarks/results/window_seams.json

The reference is a portrait image or a clip's landmarks.npz (its first frame); poses a pose-image video or a
landmarks .npz (default: the reference clip's own landmarks, else a synthetic talking head).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aniportrait.bundle import Bundle
from aniportrait.data.clip import Manifest
from aniportrait.data.sources import SyntheticSource
from aniportrait.inference import AnimationOptions, draw_pose_images, load_reference, pose_frames_from_file
from aniportrait.pipelines.context import context_schedule
from aniportrait.pipelines.pose2video import Pose2VideoPipeline
from aniportrait.pipelines.presets import SAMPLING_PRESETS, sampling_preset


def seam_profile(frames: np.ndarray, windows: list[torch.Tensor]) -> dict[str, Any]:
    """(T, H, W, 3) uint8 frames denoised in ``windows`` (frame indices each) -> the difference profile and the
    border and interior statistics (see the module docstring)."""
    steps = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))  # (T - 1,)
    holders = [frozenset(index for index, window in enumerate(windows) if frame in set(window.tolist()))
               for frame in range(len(frames))]
    borders = [t for t in range(len(steps)) if holders[t] != holders[t + 1]]
    interior = [float(steps[t]) for t in range(len(steps)) if t not in borders]
    excess = [float(steps[t] - (steps[t - 1] + steps[t + 1]) / 2) for t in borders if 0 < t < len(steps) - 1]
    border_mean = float(np.mean(steps[borders])) if borders else None
    interior_median = statistics.median(interior) if interior else None
    return {
        "frame_difference": [round(float(value), 4) for value in steps],
        "borders": borders,
        "border_mean": border_mean,
        "interior_median": interior_median,
        "seam_ratio": border_mean / interior_median if border_mean is not None and interior_median else None,
        "border_excess": float(np.mean(excess)) if excess else None,
    }


def _inputs(args: argparse.Namespace, size: tuple[int, int]):
    """The portrait, the pose images (T, H, W, 3) and the reference pose image."""
    reference, poses = args.reference, args.poses
    if reference is None:  # a synthetic talking head: its first frame and its landmarks
        root = SyntheticSource(root=tempfile.mkdtemp(prefix="window_seams_"), identities=1, clips_per_identity=1,
                               clip_seconds=args.frames / 30 + 0.5, size=max(size), progress=False).resolve()
        reference = root / Manifest.load(root).records[0].landmarks
    portrait = load_reference(reference, 0, max(size), args.landmarker_model)
    pose_source = poses or (reference if Path(reference).suffix == ".npz" else None)
    if pose_source is None:
        raise SystemExit("--poses is needed with an image reference: a pose-image video or a landmarks .npz")
    frames, _, _ = pose_frames_from_file(pose_source, size, AnimationOptions(length=args.frames), 30.0)
    indices = np.zeros(args.frames, dtype=np.int64) if args.still else np.arange(min(args.frames, len(frames)))
    reference_pose = draw_pose_images(portrait.lmks[None, :468, :2], size)[0]
    return portrait, frames.render(indices), reference_pose


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bundle = Bundle.open(args.bundle)
    pipeline = Pose2VideoPipeline.from_bundle(bundle, device)
    settings = pipeline.video_settings
    size = (int(args.height or settings.get("height") or 512), int(args.width or settings.get("width") or 512))
    portrait, pose_images, reference_pose = _inputs(args, size)
    steps = int(args.steps or settings.get("num_inference_steps", 25))
    guidance = float(args.guidance or settings.get("guidance_scale", 3.5))
    context_frames = int(args.context_frames or settings.get("context_frames", 16))
    context_overlap = int(args.context_overlap if args.context_overlap is not None else settings.get("context_overlap", 4))
    results: dict[str, Any] = {
        "bundle": bundle.path.name, "bundle_sampling": settings.get("sampling", "project"), "device": device,
        "frames": len(pose_images), "size": list(size), "steps": steps, "guidance": guidance, "seed": args.seed,
        "context_frames": context_frames, "context_overlap": context_overlap, "still": bool(args.still),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "presets": {},
    }
    for name in args.presets:
        pipeline.preset = sampling_preset(name)
        frames = pipeline(portrait.image, pose_images, reference_pose, num_inference_steps=steps, guidance_scale=guidance,
                          context_frames=context_frames, context_overlap=context_overlap, width=size[1], height=size[0],
                          generator=torch.Generator().manual_seed(args.seed), progress=args.progress)
        guided = guidance > 1.0 if pipeline.preset.guidance_above_one else guidance != 1.0
        schedule = context_schedule(pipeline.preset.context_schedule, len(frames), context_frames, context_overlap, guided)
        results["presets"][name] = {"context_schedule": pipeline.preset.context_schedule,
                                    "windows": [[int(w[0]), int(w[-1])] for w in schedule.windows],
                                    **seam_profile(frames, schedule.windows)}
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle with stage B (a trained one, for seams)")
    parser.add_argument("--reference", type=Path, default=None, help="portrait image or clip landmarks.npz")
    parser.add_argument("--poses", type=Path, default=None, help="pose-image video or landmarks .npz")
    parser.add_argument("--frames", type=int, default=64, help="frames (default 64: 5 windows of 16, overlap 4)")
    parser.add_argument("--still", action="store_true", help="hold the first pose: only seams and flicker change")
    parser.add_argument("--presets", nargs="+", default=list(SAMPLING_PRESETS), choices=list(SAMPLING_PRESETS))
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the bundle's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the bundle's)")
    parser.add_argument("--context-frames", type=int, default=None)
    parser.add_argument("--context-overlap", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default=None, help="default: cuda if present")
    parser.add_argument("--landmarker-model", default=None, help="MediaPipe face_landmarker .task (image references)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--output", type=Path, default=None, help="write the results JSON here")
    args = parser.parse_args(argv)
    results = measure(args)
    for name, result in results["presets"].items():
        ratio, excess = result["seam_ratio"], result["border_excess"]
        print(f"{name:9s} windows {result['windows']}: border/interior {ratio if ratio is None else round(ratio, 3)}, "
              f"border excess {excess if excess is None else round(excess, 3)} levels")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
