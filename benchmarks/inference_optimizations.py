"""Issue 8, inference: the pose-to-video pipeline with and without each speed switch, same sampler settings.

Full SD-1.5 architecture with random weights (``video_bench_setup.random_sd15_backbone``), 512 x 512, 25 DDIM
steps (the official inference_v2 scheduler), CFG 3.5, a synthetic talking head's pose images (48 frames: the
official figure's length). Variants, each one ``Pose2VideoPipeline.__call__`` timed with CUDA events after a
warm-up:

    plain       context windows of 16 frames, overlap 4, one window per UNet call (the official algorithm)
    batched     the same windows, all in one UNet call (``window_batch``)
    auto        the fewest windows of <= 32 frames with overlap 4 (``context_frames="auto"``), batched
    fast        auto + channels-last weights + cuDNN autotuning
    compiled    fast + torch.compile of the denoising UNet and the VAE decoder
    compiled_dpm10  compiled with DPM-Solver++ in 10 steps (as fast_dpm10)
    fast_dpm10  fast with DPM-Solver++ (2nd order) in 10 steps instead of DDIM in 25: the fast mode; its frames are
                compared with the 25-step DDIM frames of ``fast`` when that ran too (``psnr_vs_fast_db``)

Timing: wall clock around the call after torch.cuda.synchronize (the call ends by copying frames to the host).
Quality: every variant's frames against an fp32 run of the plain algorithm with the same window layout and seed
(PSNR, dB). Random weights make the denoiser chaotic, so bf16 rounding alone can move frames far; the CPU tests
(tests/pipelines/test_pose2video_speed.py) check that each switch keeps the function. Writes JSON to --out.

    python benchmarks/inference_optimizations.py --variants plain,batched,auto,fast
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from video_bench_setup import random_sd15_backbone

from aniportrait.data.synthetic import SyntheticSpec, generate_clip
from aniportrait.face.drawing import draw_landmark_sequence
from aniportrait.models.video_backbone import build_video_models
from aniportrait.pipelines.pose2video import (
    DECODE_BATCH_SIZE,
    INFERENCE_V2_SCHEDULER,
    Pose2VideoPipeline,
    build_scheduler,
    context_windows,
)
from aniportrait.training.distill import lcm_scheduler_config

RESULTS = Path(__file__).parent / "results" / "inference_optimizations.json"
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"context_frames": 16, "window_batch": 1},
    "batched": {"context_frames": 16, "window_batch": 64},
    "auto": {"context_frames": "auto", "window_batch": 64},
    "fast": {"context_frames": "auto", "window_batch": 64, "channels_last": True},
    "compiled": {"context_frames": "auto", "window_batch": 64, "channels_last": True, "compile": {}},
    "fast_dpm10": {"context_frames": "auto", "window_batch": 64, "channels_last": True, "steps": 10,
                   "scheduler": {**INFERENCE_V2_SCHEDULER, "_target_": "diffusers.DPMSolverMultistepScheduler",
                                 "algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"}},
}
VARIANTS["compiled_dpm10"] = {**VARIANTS["fast_dpm10"], "compile": {}}
# The distilled student's sampling (stage 3, settings.video.distilled): LCMScheduler, 4 steps, no guidance. Random
# weights: this times the student's sampler at SD-1.5 shapes (its speed does not depend on what it learnt).
VARIANTS["student4"] = {"context_frames": "auto", "window_batch": 64, "channels_last": True, "steps": 4,
                        "guidance": 1.0, "scheduler": lcm_scheduler_config(INFERENCE_V2_SCHEDULER, 50, 10.0)}
VARIANTS["student4_compiled"] = {**VARIANTS["student4"], "compile": {}}
# Deep-feature reuse (DeepCache, deep_cache_interval): the whole UNet every 2nd / 3rd step, its top level between;
# the same sampler and steps as the default, other frames (their quality: the learning benchmark's deepcache rows).
VARIANTS["deepcache2"] = {"context_frames": 16, "window_batch": 1, "deep_cache_interval": 2}
VARIANTS["auto_deepcache2"] = {**VARIANTS["auto"], "deep_cache_interval": 2}
VARIANTS["auto_deepcache3"] = {**VARIANTS["auto"], "deep_cache_interval": 3}
# What infer.py does without flags for a bundle trained here (the project preset): fewest windows, one window per
# UNet call (the memory bound of the default), deep features reused every 2nd step.
VARIANTS["trained_default"] = {"context_frames": "auto", "window_batch": 1, "deep_cache_interval": 2}


def talking_head(frames: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic portrait (frame 0) and ``frames`` pose images drawn from its exact landmarks."""
    clip = generate_clip(SyntheticSpec(identities=1, clips_per_identity=1, clip_seconds=frames / 30 + 0.2, size=size),
                         0, 0)
    pixels = clip.landmarks["lmks"][:frames, :468, :2] * size
    return clip.frames[0], draw_landmark_sequence(pixels, (size, size))


def build(backbone: dict[str, Any], dtype: torch.dtype, variant: dict[str, Any], device: str = "cuda") -> Pose2VideoPipeline:
    models = build_video_models(backbone, use_motion_module=True)
    torch.manual_seed(1)
    with torch.no_grad():  # random weights everywhere: zero-initialised motion outputs would hide the temporal layers
        for param in models.denoising_unet.motion_module_parameters():
            if not param.any():
                param.normal_(0, 0.02)
    pipeline = Pose2VideoPipeline(models.vae.eval(), models.image_encoder.eval(), models.clip_image_processor,
                                  models.reference_unet.eval(), models.denoising_unet.eval(), models.pose_guider.eval(),
                                  build_scheduler(_scheduler_config(variant)), pose_scaling="official_inference")
    pipeline = pipeline.to(device, dtype)
    torch.backends.cudnn.benchmark = bool(variant.get("channels_last"))
    return pipeline.optimize(channels_last=bool(variant.get("channels_last")), compile=variant.get("compile"))


def _scheduler_config(variant: dict[str, Any]) -> dict[str, Any]:
    config = dict(variant.get("scheduler", INFERENCE_V2_SCHEDULER))
    if config["_target_"] != "diffusers.DDIMScheduler":  # DDIM-only keys
        for key in ("clip_sample", "set_alpha_to_one"):
            config.pop(key, None)
    return config


def sample(pipeline: Pose2VideoPipeline, reference, poses, variant, args) -> np.ndarray:
    return pipeline(reference, poses, num_inference_steps=variant.get("steps", args.steps),
                    guidance_scale=variant.get("guidance", args.guidance),
                    context_frames=variant["context_frames"], context_overlap=4, window_batch=variant["window_batch"],
                    generator=torch.Generator(pipeline.device).manual_seed(0), progress=False,
                    decode_batch_size=variant.get("decode_batch_size", DECODE_BATCH_SIZE),
                    deep_cache_interval=variant.get("deep_cache_interval", 1))


def _profile(pipeline: Pose2VideoPipeline, reference, poses, variant, args) -> dict[str, Any]:
    """GPU time of a 2-step call by operator (self CUDA time), and the kernel count."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sample(pipeline, reference, poses, {**variant, "steps": 2}, argparse.Namespace(steps=2, guidance=args.guidance))
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(event.self_device_time_total for event in events)
    top = sorted(events, key=lambda event: event.self_device_time_total, reverse=True)[:25]
    kernels = sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)
    return {"gpu_ms": round(total / 1000, 1), "kernels": kernels,
            "top_ops": [{"op": event.key[:90], "gpu_ms": round(event.self_device_time_total / 1000, 1),
                         "share": round(event.self_device_time_total / max(total, 1), 3), "calls": event.count}
                        for event in top]}


def psnr(a: np.ndarray, b: np.ndarray) -> float | str:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return "identical" if mse == 0 else round(10 * np.log10(255.0**2 / mse), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="plain,batched,auto,fast")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--reference-fp32", default="", help="variants to compare with an fp32 run of the plain "
                        "algorithm (same windows and seed), e.g. fast,compiled")
    parser.add_argument("--backbone-dir", type=Path, default=Path("/tmp/aniportrait-random-sd15"))
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny backbone, 64 x 64, 2 steps")
    parser.add_argument("--profile", action="store_true", help="also profile 2 steps of each variant (torch.profiler): "
                        "GPU time by operator, kernel count")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    cuda = not args.tiny
    device = "cuda" if cuda else "cpu"
    if args.tiny:
        args.size, args.steps, args.frames = 64, 2, min(args.frames, 24)
    backbone = {"kind": "tiny", "seed": 0} if args.tiny else random_sd15_backbone(args.backbone_dir)
    reference, poses = talking_head(args.frames, args.size)
    output: dict[str, Any] = {"benchmark": "pose-to-video inference, full SD-1.5 architecture (random init)",
                              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "frames": args.frames,
                              "size": args.size, "steps": args.steps, "guidance": args.guidance, "dtype": "bf16",
                              "results": [], "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    references: dict[str, np.ndarray] = {}
    outputs: dict[str, np.ndarray] = {}
    for name in args.variants.split(","):
        variant = VARIANTS[name]
        pipeline = build(backbone, torch.bfloat16 if cuda else torch.float32, variant, device)
        warm_start = time.perf_counter()
        sample(pipeline, reference, poses, {**variant, "steps": 2}, argparse.Namespace(steps=2, guidance=args.guidance))
        warmup = time.perf_counter() - warm_start
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        for _ in range(args.repeats):
            pipeline.forget_reference()  # each timed video runs its reference pass, as a user's first video does
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            frames = sample(pipeline, reference, poses, variant, args)
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        median = statistics.median(seconds)
        windows = context_windows(args.frames, variant["context_frames"], 4)
        outputs[name] = frames
        profile = _profile(pipeline, reference, poses, variant, args) if args.profile and cuda else None
        result = {"variant": name, "guidance": variant.get("guidance", args.guidance),
                  "decode_batch_size": variant.get("decode_batch_size", DECODE_BATCH_SIZE),
                  **{k: v for k, v in variant.items() if k not in ("compile", "scheduler")},
                  "scheduler": _scheduler_config(variant)["_target_"].split(".")[-1],
                  "steps": variant.get("steps", args.steps),
                  "compile": variant.get("compile") is not None, "windows": [[w.start, w.stop] for w in windows],
                  "frame_evaluations_per_step": sum(w.stop - w.start for w in windows),
                  "seconds": round(median, 2), "seconds_per_frame": round(median / args.frames, 4),
                  "warmup_seconds": round(warmup, 1),
                  "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
        if name in args.reference_fp32.split(","):
            layout = (variant["context_frames"], variant["window_batch"])
            key = str(variant["context_frames"])
            if key not in references:
                del pipeline
                if cuda:
                    torch.cuda.empty_cache()
                fp32 = build(backbone, torch.float32, {"context_frames": layout[0], "window_batch": 1}, device)
                references[key] = sample(fp32, reference, poses, {"context_frames": layout[0], "window_batch": 1}, args)
                del fp32
            result["psnr_vs_fp32_plain_db"] = psnr(frames, references[key])
        if profile:
            result["profile_2_steps"] = profile
        if "steps" in variant and "compiled" in outputs and variant.get("compile") is not None:
            result["psnr_vs_compiled_db"] = psnr(frames, outputs["compiled"])
        if "steps" in variant and "fast" in outputs:
            result["psnr_vs_fast_db"] = psnr(frames, outputs["fast"])  # the quality cost of fewer steps
        output["results"].append(result)
        print(json.dumps(result), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(output, indent=1) + "\n")
        pipeline = None
        if cuda:
            torch.cuda.empty_cache()
    plain = next((r for r in output["results"] if r["variant"] == "plain"), None)
    if plain:
        for result in output["results"]:
            result["speedup_vs_plain"] = round(plain["seconds"] / result["seconds"], 2)
        args.out.write_text(json.dumps(output, indent=1) + "\n")


if __name__ == "__main__":
    main()
