"""The whole metric suite of ``evaluate.py generated=DIR`` on N clips x F frames at S x S (target: 100 x 64 at 512
within 2 minutes on one GPU).

Every network is random-init with its real architecture and cost (``metrics.random_init``: Inception-v3, an
I3D-shaped network of I3D's widths, SyncNet ``S``, LPIPS-AlexNet; a small stand-in for ArcFace), so the
numbers mean nothing but the time is the time of the real suite; face landmarks use the real MediaPipe model
(``--landmarker``; without one the landmark metrics and CSIM are skipped and the JSON says so). The clips
are synthetic talking heads rendered at S x S (a few distinct clips, repeated under new ids to reach N);
the "generated" videos are the ground truth shifted by 2 pixels with noise, written as H.264 with the speech.
Timed: ``evaluate_videos`` end to end (decoding, alignment, landmarks and face crops in loader workers,
every metric, both sanity rows, the Fréchet distances). Writes benchmarks/results/metrics_speed.json.

    python benchmarks/metrics_speed.py --device cuda                       # 100 clips x 64 frames at 512
    python benchmarks/metrics_speed.py --device cpu --clips 3 --frames 20 --size 64   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from aniportrait.audio.io import load_audio
from aniportrait.data.clip import Manifest
from aniportrait.data.sources import SyntheticSource
from aniportrait.data.video import read_video, write_video
from aniportrait.evaluation import evaluate_videos
from aniportrait.metrics.suite import MetricSuite

RESULTS = Path(__file__).parent / "results" / "metrics_speed.json"
SHARED_SAMPLES = Path(os.environ.get("ANIPORTRAIT_SHARED", Path(__file__).resolve().parents[1].parent / "shared")) / "samples"
DEFAULT_LANDMARKER = SHARED_SAMPLES / "models" / "face_landmarker_v2_with_blendshapes.task"
TARGET_SECONDS = 120.0


def make_benchmark_data(work: Path, clips: int, frames: int, size: int, distinct: int, workers: int) -> tuple[Path, Path]:
    """A dataset root with ``clips`` test clips (``distinct`` rendered ones under many ids) and the generated videos."""
    seconds = frames / 30.0 + 0.2
    rendered = SyntheticSource(root=str(work / "synthetic"), identities=distinct, clips_per_identity=1, clip_seconds=seconds,
                               size=size, workers=workers, progress=False).resolve()
    manifest = Manifest.load(rendered)
    base = list(manifest.records)
    generated = work / "generated"
    generated.mkdir()
    rng = np.random.default_rng(0)
    for record in base:
        truth = read_video(rendered / record.video)
        shifted = np.roll(truth, 2, axis=2).astype(np.int16) + rng.integers(-6, 7, truth.shape)
        write_video(generated / f"{record.id}.mp4", np.clip(shifted, 0, 255).astype(np.uint8), record.fps,
                    audio=load_audio(rendered / record.audio), preset="veryfast")
    records = []
    for index in range(clips):
        source = base[index % len(base)]
        record = type(source)(**{**source.__dict__, "id": f"bench{index:03d}", "split": "test"})
        if index >= len(base):  # a repeat: copy the video its source was renamed to
            shutil.copy(generated / f"bench{index % len(base):03d}.mp4", generated / f"{record.id}.mp4")
        else:
            (generated / f"{source.id}.mp4").rename(generated / f"{record.id}.mp4")
        records.append(record)
    Manifest(rendered, records).save()
    return rendered, generated


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--distinct", type=int, default=8, help="distinct rendered clips (repeated to reach --clips)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="loader processes")
    parser.add_argument("--landmarker", default=os.environ.get("ANIPORTRAIT_FACE_LANDMARKER", str(DEFAULT_LANDMARKER)))
    parser.add_argument("--i3d-width", type=float, default=1.0, help="channel scale of the I3D-shaped network")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    landmarker = args.landmarker if Path(args.landmarker).is_file() else None
    enabled = ["fid", "fvd", "lpips", "ssim", "psnr", "sync"] + (["landmarks", "identity"] if landmarker else [])
    metrics = {"random_init": {"enabled": True, "seed": 0, "i3d_width": args.i3d_width}, "download": False,
               "face_landmarker": landmarker, "enabled": enabled}
    protocol = {"name": "default", "frames_per_clip": args.frames, "sanity": True, "reference_frame": 0,
                "fid": {"frame_stride": 1, "antialias": False, "batch_size": 64},
                "fvd": {"clip_frames": 16, "frame_stride": 1, "clips_per_video": 4, "seed": 0, "batch_size": 8},
                "lpips": {"net": "alex", "batch_size": 16},
                "sync": {"vshift": 15, "crop_scale": 0.4, "crop_from": "auto", "audio": "video", "batch_size": 64}}
    with tempfile.TemporaryDirectory(prefix="metrics_speed_") as folder:
        started = time.perf_counter()
        root, generated = make_benchmark_data(Path(folder), args.clips, args.frames, args.size,
                                              min(args.distinct, args.clips), args.workers)
        setup_s = time.perf_counter() - started
        started = time.perf_counter()
        suite = MetricSuite.from_config(metrics, protocol, args.device)
        build_s = time.perf_counter() - started
        records = Manifest.load(root).split("test")
        results = evaluate_videos(root, records, lambda record: generated / f"{record.id}.mp4", suite, protocol,
                                  args.workers)
    timing = results["timing"]
    report = {
        "benchmark": "metric suite of evaluate.py generated=DIR (random-init networks of the real architectures)",
        "clips": args.clips, "frames_per_clip": args.frames, "size": args.size, "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor(),
        "workers": args.workers, "metrics": enabled, "unavailable": results["unavailable"],
        "landmarker": landmarker or "none given: landmark metrics and CSIM not timed",
        "rows_per_clip": ["generated", "ground_truth", "copy_reference"],
        "scored_clips": len(results["scored"]), "suite_seconds": timing["total_s"], "target_seconds": TARGET_SECONDS,
        "within_target": timing["total_s"] <= TARGET_SECONDS, "timing": timing,
        "network_build_s": build_s, "data_setup_s_not_timed": setup_s,
        "frames_per_second": args.clips * args.frames / timing["total_s"],
        "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2).replace(str(Path.home()), "~")  # no machine paths in shared results
    args.output.write_text(text + "\n")
    print(f"metric suite: {args.clips} clips x {args.frames} frames at {args.size}px on {args.device}: "
          f"{timing['total_s']:.1f} s (target {TARGET_SECONDS:.0f} s; waiting for clips {timing['waiting_for_clips_s']:.1f} s) "
          f"-> {args.output}")
    return report


if __name__ == "__main__":
    main()
