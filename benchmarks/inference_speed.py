"""Video generation speed with the full SD-1.5 architecture (random init, no downloads): seconds per frame, peak
memory, and the accelerated mode's speed-up.

The official inference settings: 512 x 512, 25 DDIM steps (inference_v2 scheduler), classifier-free guidance 3.5,
context windows of 16 frames overlapping by 4, bf16. For each frame count (64: the issue-5 figure; 48: the issue-8
comparison point) one ``Pose2VideoPipeline.__call__`` is timed with CUDA events, after a warm-up on one context window;
seconds per frame is the median over the repeats divided by the frames, and the peak memory is
``torch.cuda.max_memory_allocated`` over those calls. Then, on the first frame count, the plain and the accelerated
mode (``keyframe_interval``, default 3, with the default optical-flow interpolator) run end to end through
``aniportrait.inference.generate_video`` (pose drawing, sampling, interpolation, H.264 writing); the speed-up is
plain seconds / accelerated seconds. Pose images are a synthetic talking head's landmarks (real head motion and mouth).
Results are merged into benchmarks/results/inference_speed.json (one entry per frame count), so frame counts can be
measured in separate calls.

    python benchmarks/inference_speed.py                    # GPU: writes the random SD-1.5 backbone once (~5 GB)
    python benchmarks/inference_speed.py --frames 48 --no-accelerated
    python benchmarks/inference_speed.py --tiny             # CPU smoke test: tiny backbone, 64 x 64, 2 steps
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from video_bench_setup import Timer, random_sd15_backbone

from aniportrait.bundle import official_settings
from aniportrait.data.clip import Manifest, load_landmarks
from aniportrait.data.portrait import portrait_from_landmarks_npz
from aniportrait.data.sources import SyntheticSource
from aniportrait.data.video import read_video
from aniportrait.face.portrait import Portrait
from aniportrait.inference import AnimationOptions, LandmarkPoseFrames, generate_video
from aniportrait.models.video_backbone import build_video_models
from aniportrait.pipelines.pose2video import Pose2VideoPipeline, build_scheduler

RESULTS = Path(__file__).parent / "results" / "inference_speed.json"


def build_pipeline(args: argparse.Namespace) -> Pose2VideoPipeline:
    """Stage B with the official inference settings on random SD-1.5-shaped weights (or the tiny backbone)."""
    backbone = {"kind": "tiny", "seed": 0} if args.tiny else random_sd15_backbone(args.cache, args.size, args.size)
    models = build_video_models(backbone, use_motion_module=True)
    settings = official_settings(stage_a=False, stage_b=True)["video"]
    pipeline = Pose2VideoPipeline(models.vae.eval(), models.image_encoder.eval(), models.clip_image_processor,
                                  models.reference_unet.eval(), models.denoising_unet.eval(), models.pose_guider.eval(),
                                  build_scheduler(settings["scheduler"]), pose_scaling=settings["pose_scaling"])
    pipeline.video_settings = settings
    return pipeline.to(args.device, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype])


def talking_head(args: argparse.Namespace, frames: int) -> tuple[Portrait, np.ndarray]:
    """A synthetic portrait (its first frame) and (frames, 468, 2) landmarks in [0, 1] of its clip."""
    seconds = frames / 30 + 0.5
    root = SyntheticSource(root=str(args.cache / "synthetic"), identities=3, clips_per_identity=1,
                           clip_seconds=seconds, size=args.size, progress=False).resolve()
    clip = root / Manifest.load(root).records[0].landmarks
    return portrait_from_landmarks_npz(clip, 0, args.size), load_landmarks(clip)["lmks"][:frames, :468, :2]


def time_pipeline(pipeline: Pose2VideoPipeline, portrait: Portrait, landmarks: np.ndarray,
                  args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per frame (median of the repeats) and peak memory of one pipeline call on all the frames."""
    cuda = args.device == "cuda"
    frames = len(landmarks)
    pose_images = LandmarkPoseFrames(landmarks, (args.size, args.size)).render(np.arange(frames))
    sampling = {"guidance_scale": args.guidance, "context_frames": 16, "context_overlap": 4, "width": args.size,
                "height": args.size, "progress": False}
    pipeline(portrait.image, pose_images[:16], None, num_inference_steps=2, **sampling)  # warm-up: one window's shapes
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for repeat in range(args.repeats):
        pipeline.forget_reference()  # each timed video runs its reference pass, as a user's first video does
        with Timer(cuda) as timer:
            pipeline(portrait.image, pose_images, None, num_inference_steps=args.steps,
                     generator=torch.Generator("cpu").manual_seed(repeat), **sampling)
        seconds.append(timer.seconds)
        print(f"{frames} frames: {timer.seconds:.2f} s", flush=True)
    median = statistics.median(seconds)
    result: dict[str, Any] = {"frames": frames, "seconds": [round(s, 3) for s in seconds],
                              "seconds_median": round(median, 3), "seconds_per_frame": round(median / frames, 4),
                              "frames_per_second": round(frames / median, 3)}
    if cuda:
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return result


def time_accelerated(pipeline: Pose2VideoPipeline, portrait: Portrait, landmarks: np.ndarray,
                     args: argparse.Namespace) -> dict[str, Any]:
    """Plain vs accelerated mode end to end through generate_video (drawing, sampling, interpolation, writing)."""
    poses = LandmarkPoseFrames(landmarks, (args.size, args.size))
    seconds = {}
    with tempfile.TemporaryDirectory() as folder:
        for interval in (1, args.keyframe_interval):
            options = AnimationOptions(width=args.size, height=args.size, steps=args.steps, guidance=args.guidance,
                                       keyframe_interval=interval, progress=False)
            pipeline.forget_reference()
            if args.device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            generate_video(pipeline, portrait, poses, Path(folder) / f"every_{interval}.mp4", 30.0, None, options)
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds[interval] = time.perf_counter() - started
            print(f"keyframe_interval={interval}: {seconds[interval]:.2f} s end to end", flush=True)
        # quality loss of the accelerated mode: its frames against the plain mode's (both through H.264)
        plain_frames = read_video(Path(folder) / "every_1.mp4").astype(np.float64)
        fast_frames = read_video(Path(folder) / f"every_{args.keyframe_interval}.mp4").astype(np.float64)
        mse = np.mean((plain_frames - fast_frames) ** 2, axis=(1, 2, 3))
        keyframes = np.zeros(len(mse), bool)
        keyframes[:: args.keyframe_interval] = keyframes[-1] = True
        psnr = {name: round(float(10 * np.log10(255.0**2 / max(np.mean(mse[mask]), 1e-12))), 2)
                for name, mask in (("all", np.ones_like(keyframes)), ("keyframes", keyframes),
                                   ("interpolated", ~keyframes)) if mask.any()}
    plain, fast = seconds[1], seconds[args.keyframe_interval]
    return {"frames": len(landmarks), "keyframe_interval": args.keyframe_interval, "interpolator": "FlowInterpolator",
            "plain_seconds": round(plain, 3), "accelerated_seconds": round(fast, 3),
            "plain_seconds_per_frame": round(plain / len(landmarks), 4),
            "accelerated_seconds_per_frame": round(fast / len(landmarks), 4), "speedup": round(plain / fast, 2),
            "psnr_vs_plain_db": psnr}


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers

    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    return {"device": device, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cuda": torch.version.cuda, "dtype": args.dtype, "size": args.size, "steps": args.steps,
            "guidance": args.guidance, "context": [16, 4], "scheduler": "DDIM (official inference_v2)",
            "weights": "tiny random init" if args.tiny else "random init, SD-1.5 architecture",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 48], help="frame counts (default: 64 48)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per frame count (default 2)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--keyframe-interval", type=int, default=3, help="accelerated mode's k (default 3)")
    parser.add_argument("--no-accelerated", action="store_true", help="skip the plain-vs-accelerated comparison")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "aniportrait" / "benchmarks",
                        help="where the random backbone and the synthetic talking head are written once")
    parser.add_argument("--output", type=Path, default=None, help=f"results JSON (default {RESULTS})")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny backbone, 64 x 64, 2 steps")
    args = parser.parse_args()
    if args.tiny:
        args.size, args.steps, args.dtype, args.repeats = 64, 2, "fp32", 1
        args.frames = [max(1, frames * 3 // 8) for frames in args.frames]  # 64, 48 -> 24, 18
        args.output = args.output or Path(tempfile.mkdtemp(prefix="inference_speed_")) / "inference_speed.json"
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu" and not args.tiny:
        raise SystemExit("no CUDA device: the SD-1.5 benchmark needs a GPU (use --tiny for a CPU smoke test)")
    output = args.output or RESULTS
    results = json.loads(output.read_text()) if output.is_file() else {}
    pipeline = build_pipeline(args)
    portrait, landmarks = talking_head(args, max(args.frames))
    results["environment"] = environment(args)
    for frames in args.frames:
        results[f"frames_{frames}"] = time_pipeline(pipeline, portrait, landmarks[:frames], args)
    if not args.no_accelerated:
        results[f"accelerated_{args.frames[0]}"] = time_accelerated(pipeline, portrait, landmarks[: args.frames[0]], args)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"results: {output}")


if __name__ == "__main__":
    main()
