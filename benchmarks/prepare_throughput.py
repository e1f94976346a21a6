"""Dataset preparation throughput on the shared sample videos: clips per minute and seconds of video per
second, with the default settings (512 px, 30 fps), for one worker process and for one per CPU core.

Each run prepares into a fresh temporary root (nothing is resumed). Clip lengths differ between datasets,
so the video-seconds rate (a real-time factor) is the number to compare across machines. Writes
benchmarks/results/prepare_throughput.json and prints one line per run.

    python benchmarks/prepare_throughput.py [--input DIR] [--workers 1 2] [--size 512] [--fps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from aniportrait.data.clip import Manifest
from aniportrait.data.prepare import PrepareConfig, prepare_dataset
from aniportrait.face.landmarks import resolve_landmarker_model

RESULTS = Path(__file__).parent / "results" / "prepare_throughput.json"
SHARED_SAMPLES = Path(os.environ.get("ANIPORTRAIT_SHARED", Path(__file__).resolve().parents[1].parent / "shared")) / "samples"


def run(input_dir: Path, workers: int, size: int, fps: float, model: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="prepare_bench_") as folder:
        config = PrepareConfig(input=str(input_dir), output=str(Path(folder) / "dataset"), size=size, fps=fps,
                               workers=workers, landmarker_model=str(model), progress=False)
        start = time.perf_counter()
        result = prepare_dataset(config)
        elapsed = time.perf_counter() - start
        seconds = sum(record.duration_s for record in Manifest.load(result.root))
    return {
        "workers": workers,
        "sources": result.sources,
        "clips_kept": result.clips_kept,
        "clips_rejected": result.clips_rejected,
        "video_seconds": round(seconds, 2),
        "wall_seconds": round(elapsed, 2),
        "clips_per_minute": round(result.clips_kept / elapsed * 60, 2),
        "video_seconds_per_second": round(seconds / elapsed, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=SHARED_SAMPLES / "video")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--model", type=Path, default=SHARED_SAMPLES / "models" / "face_landmarker_v2_with_blendshapes.task")
    args = parser.parse_args()
    model = resolve_landmarker_model(args.model if args.model.is_file() else None)
    runs = []
    for workers in dict.fromkeys(args.workers):  # unique, in order
        outcome = run(args.input, workers, args.size, args.fps, model)
        runs.append(outcome)
        print(f"prepare, {workers} worker(s): {outcome['clips_per_minute']} clips/min, "
              f"{outcome['video_seconds_per_second']} s of video per s ({outcome['clips_kept']} clips, "
              f"{outcome['video_seconds']} s of video in {outcome['wall_seconds']} s)")
    result = {
        "benchmark": "python -m aniportrait.data.prepare on a folder of talking-head videos, fresh output root",
        "input": Path(args.input).name,  # the folder name only: no machine paths in committed results
        "size": args.size,
        "fps": args.fps,
        "runs": runs,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine slows the runs
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
