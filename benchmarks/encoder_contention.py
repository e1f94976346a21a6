"""H.264 encoding beside a busy Python thread: on a thread of the same process against a child process (CPU).

Stage B's frames are sampled on one thread, which spends its time launching GPU kernels from Python, while the
video is encoded. This measures what sharing the interpreter does to both: 512 x 512 frames (a synthetic talking
head) through ``VideoWriter`` on the calling thread and through ``EncoderProcess`` (the writer in a child process),
each alone and with a second thread running a pure-Python loop (a stand-in for the kernel-launching thread),
reporting ms per encoded frame and the loop's iterations per second against the loop alone.

    python benchmarks/encoder_contention.py        # writes benchmarks/results/encoder_contention.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from aniportrait.data.synthetic import SyntheticSpec, generate_clip
from aniportrait.data.video import VideoWriter
from aniportrait.data.video_encoder import EncoderProcess
from aniportrait.utils.atomic import atomic_path

RESULTS = Path(__file__).parent / "results" / "encoder_contention.json"


class BusyLoop:
    """A Python loop on its own thread, counting its iterations while it runs."""

    def __init__(self):
        self.iterations, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.iterations += 1

    def __enter__(self) -> BusyLoop:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.rate = self.iterations / (time.perf_counter() - self._started)


def encode(writer_class, frames: np.ndarray, folder: Path, preset: str) -> float:
    """Seconds per frame to encode ``frames`` one at a time, as generate_video hands them over."""
    started = time.perf_counter()
    with writer_class(folder / f"{writer_class.__name__}.mp4", 30, preset=preset) as writer:
        for frame in frames:
            writer.write(frame)
    return (time.perf_counter() - started) / len(frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--preset", default="medium", help="x264 preset (VideoWriter's default: medium)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    clip = generate_clip(SyntheticSpec(identities=1, clips_per_identity=1, clip_seconds=args.frames / 30 + 0.2,
                                       size=args.size), 0, 0)
    frames = clip.frames[: args.frames]
    with BusyLoop() as alone:
        time.sleep(2.0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for writer_class in (VideoWriter, EncoderProcess):
            quiet = encode(writer_class, frames, Path(folder), args.preset)
            with BusyLoop() as loop:
                busy = encode(writer_class, frames, Path(folder), args.preset)
            rows.append({"writer": writer_class.__name__, "ms_per_frame_alone": round(quiet * 1000, 2),
                         "ms_per_frame_beside_busy_thread": round(busy * 1000, 2),
                         "busy_thread_rate_vs_alone": round(loop.rate / alone.rate, 3)})
            print(json.dumps(rows[-1]))
    document = {"benchmark": "benchmarks/encoder_contention.py", "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(), "frames": args.frames, "size": args.size, "preset": args.preset,
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
