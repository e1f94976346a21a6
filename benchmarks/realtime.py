"""Real time (issue 17): stage B end to end with the distilled student's sampler, streamed, at SD-1.5 shapes.

A 60 s talking head (30 fps, 512 x 512) goes through ``aniportrait.inference.generate_video`` as ``infer.py
fast=true`` runs it: pose images drawn chunk by chunk, the student's sampler (``LCMScheduler``, 4 steps, no
classifier-free guidance: ``settings.video.distilled``), VAE decoding, H.264 with the speech muxed as AAC, written
frame by frame while the next chunk samples (``generate_video``'s writer overlap). Measured: frames per second over
the whole video (wall clock from the call to the closed file), the first-frame latency (from the call until the
first frame is encoded: what a streaming viewer waits), the steady rate after it, and peak GPU memory.

The weights are random (the student has the teacher's architecture, so its speed does not depend on what it
learnt); the student's quality comes from the learning benchmark (``--quality``: stage_b_learning*.json's
``distillation`` block, the 4-step student against the 25-step teacher on held-out clips of the small backbone) and
is copied into the result with its source. ``--sequential`` also times a shorter video with sampling and writing on
one thread (the overlap's lever); ``--breakdown`` one more with the time of each part (:class:`StageTimes`).

    python benchmarks/realtime.py                                  # GPU: writes benchmarks/results/realtime.json
    python benchmarks/realtime.py --seconds 20 --steps 2 --out /tmp/realtime_2.json
    python benchmarks/realtime.py --steps 2 --decode-batch 8 --breakdown 20   # + where 20 s of video spend time
    python benchmarks/realtime.py --tiny                           # CPU smoke test: tiny backbone, 64 x 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from inference_optimizations import VARIANTS, build
from video_bench_setup import random_sd15_backbone

import aniportrait.inference.generate as generate_module
from aniportrait.data.synthetic import SyntheticSpec, generate_clip
from aniportrait.data.video_encoder import encoder_threads
from aniportrait.face.portrait import Portrait
from aniportrait.inference import AnimationOptions, LandmarkPoseFrames, generate_video
from aniportrait.pipelines.pose2video import DECODE_BATCH_SIZE

RESULTS = Path(__file__).parent / "results" / "realtime.json"


def talking_head(seconds: float, fps: float, size: int, clip_seconds: float) -> tuple[Any, np.ndarray, np.ndarray]:
    """A synthetic portrait, ``seconds`` of its landmarks (a ``clip_seconds`` clip played forth and back, so the
    head never jumps) and as much speech-like audio."""
    clip = generate_clip(SyntheticSpec(identities=1, clips_per_identity=1, clip_seconds=clip_seconds, size=size), 0, 0)
    landmarks = clip.landmarks["lmks"][:, :468, :2]
    frames = int(round(seconds * fps))
    cycle = np.concatenate([np.arange(len(landmarks)), np.arange(len(landmarks) - 2, 0, -1)])
    arrays = clip.landmarks
    portrait = Portrait(clip.frames[0], arrays["lmks"][0].astype(np.float32), arrays["mesh3d"][0].astype(np.float32),
                        arrays["trans_mat"][0].astype(np.float32), arrays["blendshapes"][0].astype(np.float32),
                        "synthetic#frame=0", (0, 0, size, size))
    audio = np.resize(clip.audio.astype(np.float32), int(seconds * 16_000))
    return portrait, landmarks[cycle[np.arange(frames) % len(cycle)]], audio


class StageTimes:
    """Where a streamed video's time goes, by patching the parts for the duration of a ``with`` block.

    Wall clock on the producer thread: the pose drawing, the denoising loop (synchronised at its end, so it holds
    its GPU time) and within it the pose images' conversion to tensors and the reference pass, the VAE decoding with
    its copies to the host; on the main thread the hand-over of frames to the encoder process (a full pipe waits
    for the encoder). GPU time (CUDA events, no synchronisation): each network's forwards. The producer's rest
    (cross-fading, a full frame queue) is the video's time less its parts."""

    WALL = ("pose_drawing", "pose_tensors", "reference_pass", "denoise", "decode", "encoder_write")
    TIMELINE_EVENTS = 24

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline
        self.seconds = dict.fromkeys(self.WALL, 0.0)
        self.calls = dict.fromkeys(self.WALL, 0)
        self.networks = {"denoising_unet": pipeline.denoising_unet, "pose_guider": pipeline.pose_guider,
                         "reference_unet": pipeline.reference_unet, "vae_decoder": pipeline.vae.decoder}
        self.events: dict[str, list] = {name: [] for name in self.networks}
        self.timeline: list[tuple[str, float, float]] = []  # (part, start after __enter__, seconds)
        self.started = time.perf_counter()

    def _add(self, key: str, started: float) -> None:
        ended = time.perf_counter()
        self.seconds[key] += ended - started
        self.calls[key] += 1
        if len(self.timeline) < self.TIMELINE_EVENTS:  # the first chunk's parts: what the first frame waits for
            self.timeline.append((key, round(started - self.started, 3), round(ended - started, 3)))

    def _timed(self, key: str, function: Any, synchronise: bool = False) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            result = function(*args, **kwargs)
            if synchronise and torch.cuda.is_available():
                torch.cuda.synchronize()
            self._add(key, started)
            return result
        return timed

    def _decode(self, function: Any) -> Any:
        def decode(*args: Any, **kwargs: Any) -> Any:
            frames = function(*args, **kwargs)
            while True:
                started = time.perf_counter()
                try:
                    batch = next(frames)
                except StopIteration:
                    return
                finally:
                    self._add("decode", started)
                yield batch
        return decode

    def __enter__(self) -> StageTimes:
        self.started = time.perf_counter()
        cls, writer = type(self.pipeline), generate_module.EncoderProcess
        self._saved = [(owner, name, getattr(owner, name)) for owner, name in (
            (cls, "denoise"), (cls, "decode"), (cls, "_pose_tensor"), (cls, "_write_reference"),
            (LandmarkPoseFrames, "render"), (writer, "write"))]
        patched = [self._timed("denoise", cls.denoise, synchronise=True), self._decode(cls.decode),
                   self._timed("pose_tensors", cls._pose_tensor), self._timed("reference_pass", cls._write_reference),
                   self._timed("pose_drawing", LandmarkPoseFrames.render), self._timed("encoder_write", writer.write)]
        for (owner, name, _), replacement in zip(self._saved, patched):
            setattr(owner, name, replacement)
        self._hooks = []
        if torch.cuda.is_available():
            for name, network in self.networks.items():
                def before(module, args, name=name):
                    start = torch.cuda.Event(enable_timing=True)
                    start.record()
                    self.events[name].append([start, None])

                def after(module, args, output, name=name):
                    end = torch.cuda.Event(enable_timing=True)
                    end.record()
                    self.events[name][-1][1] = end
                self._hooks += [network.register_forward_pre_hook(before), network.register_forward_hook(after)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, original in self._saved:
            setattr(owner, name, original)
        for hook in self._hooks:
            hook.remove()

    def gpu_seconds(self) -> dict[str, Any]:
        """Per network: GPU seconds of its forwards and their count (after the events are complete)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return {name: {"seconds": round(sum(start.elapsed_time(end) for start, end in pairs if end) / 1000, 3),
                       "calls": len(pairs)} for name, pairs in self.events.items()}


class _Deadline(Exception):
    """Raised from on_frame when the timed video runs past ``--deadline``."""


def run_video(pipeline, portrait, landmarks: np.ndarray, audio: np.ndarray, args: argparse.Namespace,
              output: Path, sequential: bool = False, deadline: float | None = None) -> dict[str, Any]:
    """One generate_video call, timed: total, first frame, steady rate. Past ``deadline`` (a time.perf_counter()
    value) the video is stopped (no file is kept) and the rates are those of the frames written so far
    (``complete: false``)."""
    options = AnimationOptions(width=args.size, height=args.size, steps=args.steps, guidance=args.guidance,
                               scheduler=VARIANTS["student4"]["scheduler"], sampling="project",
                               context_frames=args.context_frames, context_overlap=4, window_batch=args.window_batch,
                               decode_batch=args.decode_batch, deep_cache_interval=1,  # as a student bundle samples
                               chunk_frames=args.chunk_frames, chunk_overlap=args.chunk_overlap,
                               first_chunk_frames=args.first_chunk, encoder_threads=args.encoder_threads,
                               progress=False)
    pipeline.forget_reference()  # each video starts without an earlier video's reference pass (a new stream)
    stamps: list[float] = []

    def on_frame(_: int) -> None:
        stamps.append(time.perf_counter())
        if deadline is not None and stamps[-1] > deadline:
            raise _Deadline

    background = generate_module.in_background
    if sequential:  # sampling and writing on one thread, for comparison
        generate_module.in_background = lambda items, *_, **__: iter(items)
    complete = True
    try:
        if args.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            count = generate_video(pipeline, portrait, LandmarkPoseFrames(landmarks, (args.size, args.size)), output,
                                   args.fps, audio, options, on_frame=on_frame)
        except _Deadline:
            complete, count = False, len(stamps)
        seconds = time.perf_counter() - started  # the file is closed (and renamed) when generate_video returns
    finally:
        generate_module.in_background = background
    first = stamps[0] - started
    steady = (count - 1) / (stamps[-1] - stamps[0]) if count > 1 else None
    result = {"frames": count, "complete": complete, "video_seconds": round(count / args.fps, 2),
              "seconds": round(seconds, 3), "frames_per_s": round(count / seconds, 2),
              "first_frame_latency_s": round(first, 3), "steady_frames_per_s": None if steady is None else round(steady, 2),
              "real_time_factor": round(count / args.fps / seconds, 3),
              "bytes": output.stat().st_size if complete else None}
    if args.cuda:
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(("sequential: " if sequential else "") + json.dumps(result), flush=True)
    return result


def student_quality(paths: list[Path], steps: int) -> dict[str, Any]:
    """Per dataset, the ``steps``-step student's PSNR gap to the 25-step teacher (both against ground truth, held-out
    clips) from the learning benchmark's scored results: the first file that has the dataset's distillation block."""
    found: dict[str, Any] = {}
    for path in paths:
        if not path.is_file():
            continue
        for dataset, result in json.loads(path.read_text()).get("datasets", {}).items():
            distillation = result.get("distillation") or {}
            student, teacher = distillation.get(f"student_{steps}"), distillation.get("teacher")
            if dataset in found or not (student and teacher):
                continue
            found[dataset] = {"source": f"benchmarks/results/{path.name}", "steps": steps,
                              "gap_to_teacher_db": round(teacher["psnr"] - student["psnr"], 3),
                              "student": student, "teacher": teacher}
    return found


def summary(args: argparse.Namespace, streamed: dict[str, Any], warmup: float) -> dict[str, Any]:
    quality = student_quality(args.quality, args.steps)
    gaps = [entry["gap_to_teacher_db"] for entry in quality.values()]
    return {
        "benchmark": "benchmarks/realtime.py", "gpu": torch.cuda.get_device_name() if args.cuda else "cpu",
        "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "weights": "tiny random init" if args.tiny else "random init, SD-1.5 architecture (the student's shapes)",
        "frames_per_s": streamed["frames_per_s"], "first_frame_latency_s": streamed["first_frame_latency_s"],
        "complete": streamed["complete"],
        "psnr_gap_to_teacher_db": max(gaps) if gaps else None, "warmup_seconds": round(warmup, 1),
        "streamed": streamed, "sequential": None,
        "settings": {"size": args.size, "fps": args.fps, "steps": args.steps, "guidance": args.guidance,
                     "scheduler": "LCMScheduler (settings.video.distilled)", "dtype": "fp32" if args.tiny else "bf16",
                     "chunk_frames": args.chunk_frames, "chunk_overlap": args.chunk_overlap,
                     "first_chunk_frames": args.first_chunk,
                     "context_frames": args.context_frames, "window_batch": args.window_batch,
                     "decode_batch_size": args.decode_batch, "channels_last": True, "compile": args.compile,
                     "encoder": "libx264 crf 18 preset medium + AAC",
                     "encoder_threads": encoder_threads(args.encoder_threads)},
        "student_quality": quality or None,
        "note": f"psnr_gap_to_teacher_db: the largest over the datasets of the {args.steps}-step student's PSNR gap "
                "to the 25-step teacher (positive: the student is worse; against ground truth, held-out clips, "
                "backbone=small at 256 px), from student_quality's sources",
    }


def write(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    temporary.replace(path)


def main() -> None:
    script_started = time.perf_counter()  # --deadline counts from here: setup and warm-up included
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the timed video (default 60)")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4, help="student steps (default 4)")
    parser.add_argument("--guidance", type=float, default=1.0, help="1.0: no classifier-free guidance (the student)")
    parser.add_argument("--chunk-frames", type=int, default=64, help="frames per pipeline call (stream.chunk_frames)")
    parser.add_argument("--chunk-overlap", type=int, default=4, help="frames neighbouring chunks cross-fade")
    parser.add_argument("--first-chunk", type=int, default=None,
                        help="the first chunk's frames (stream.first_chunk_frames; default: --chunk-frames): a short "
                             "one brings the first frame sooner")
    parser.add_argument("--context-frames", default="auto")
    parser.add_argument("--window-batch", type=int, default=8, help="context windows per UNet call")
    parser.add_argument("--decode-batch", type=int, default=8,
                        help="frames per VAE call (infer.py decode_batch; the 19.2 frames/s of 2026-12-03 used 8; "
                             f"infer.py's default is {DECODE_BATCH_SIZE}, which keeps the official 48-frame peak)")
    parser.add_argument("--encoder-threads", type=int, default=None,
                        help="x264 threads (infer.py encoder_threads; default: one per core, at most 16)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet and VAE decoder")
    parser.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                        help="stop the timed video once the script has run SECONDS (model setup and warm-up "
                             "included) and report the frames written by then (complete: false): give the device "
                             "call's limit less a margin, and the measurement is never lost")
    parser.add_argument("--sequential", type=float, default=0.0, metavar="SECONDS",
                        help="also time a video of SECONDS with sampling and writing on one thread")
    parser.add_argument("--breakdown", type=float, default=0.0, metavar="SECONDS",
                        help="also time a video of SECONDS with the seconds spent in pose drawing, denoising, "
                             "decoding and the encoder hand-over (result key breakdown)")
    parser.add_argument("--quality", type=Path, nargs="*", default=[
        RESULTS.parent / "stage_b_learning_graphs.json", RESULTS.parent / "stage_b_learning.json"],
                        help="learning-benchmark results whose distillation block gives the student's quality")
    parser.add_argument("--backbone-dir", type=Path, default=Path("/tmp/aniportrait-random-sd15"))
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny backbone, 64 x 64, 3 s")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.cuda = not args.tiny
    if args.tiny:
        args.size, args.seconds, args.chunk_frames = 64, min(args.seconds, 3.0), min(args.chunk_frames, 24)
        args.sequential = min(args.sequential, 1.0)
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: the SD-1.5 benchmark needs a GPU (use --tiny for a CPU smoke test)")
    backbone = {"kind": "tiny", "seed": 0} if args.tiny else random_sd15_backbone(args.backbone_dir)
    variant = {**VARIANTS["student4"], "compile": {} if args.compile else None}
    pipeline = build(backbone, torch.float32 if args.tiny else torch.bfloat16, variant, "cpu" if args.tiny else "cuda")
    portrait, landmarks, audio = talking_head(args.seconds, args.fps, args.size, clip_seconds=min(args.seconds, 8.0))
    with tempfile.TemporaryDirectory() as folder:
        warm_start = time.perf_counter()  # a short video first: cuDNN plans, allocator, (compilation)
        warm_frames = min(len(landmarks), 2 * args.chunk_frames)
        run_video(pipeline, portrait, landmarks[:warm_frames], audio[: int(warm_frames / args.fps * 16_000)], args,
                  Path(folder) / "warmup.mp4")
        warmup = time.perf_counter() - warm_start
        streamed = run_video(pipeline, portrait, landmarks, audio, args, Path(folder) / "realtime.mp4",
                             deadline=None if args.deadline is None else script_started + args.deadline)
        result = summary(args, streamed, warmup)
        write(result, args.out)  # kept if the comparison below is stopped
        if args.sequential:
            frames = int(args.sequential * args.fps)
            overlapped = run_video(pipeline, portrait, landmarks[:frames], audio[: int(args.sequential * 16_000)], args,
                                   Path(folder) / "overlapped.mp4")
            one_thread = run_video(pipeline, portrait, landmarks[:frames], audio[: int(args.sequential * 16_000)], args,
                                   Path(folder) / "sequential.mp4", sequential=True)
            result["sequential"] = {"seconds_of_video": args.sequential, "overlapped": overlapped,
                                    "one_thread": one_thread,
                                    "speedup": round(one_thread["seconds"] / overlapped["seconds"], 3)}
            write(result, args.out)
        if args.breakdown:
            frames = int(args.breakdown * args.fps)
            with StageTimes(pipeline) as times:
                timed = run_video(pipeline, portrait, landmarks[:frames], audio[: int(args.breakdown * 16_000)], args,
                                  Path(folder) / "breakdown.mp4")
            wall = {key: round(value, 3) for key, value in times.seconds.items()}
            top_level = ("pose_drawing", "denoise", "decode")  # the producer's parts (the others are inside denoise)
            result["breakdown"] = {
                "seconds_of_video": args.breakdown, "video": timed, "encoder_threads": encoder_threads(args.encoder_threads),
                "wall_seconds": wall, "calls": times.calls, "gpu_seconds": times.gpu_seconds(),
                "first_events": times.timeline,
                "producer_other_seconds": round(timed["seconds"] - sum(wall[key] for key in top_level), 3),
                "note": "wall seconds on the producer thread (pose_drawing, denoise with pose_tensors and "
                        "reference_pass inside it, synchronised at its end; decode with the copies to the host) and "
                        "on the main thread (encoder_write: handing frames to the encoder process, which waits when "
                        "the encoder is behind); gpu_seconds from CUDA events around each network's forwards; "
                        "first_events: the first parts as (part, start, seconds) from the video's start; "
                        "producer_other: the video's time less the producer's parts (cross-fading, a full queue)"}
            print("breakdown: " + json.dumps(result["breakdown"]), flush=True)
            write(result, args.out)
    print(json.dumps({key: result[key] for key in ("gpu", "frames_per_s", "first_frame_latency_s",
                                                   "psnr_gap_to_teacher_db", "warmup_seconds")}))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
