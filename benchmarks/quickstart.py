"""Time the main job, `python train.py` (the quickstart), from an empty data folder, as a new user runs it.

Writes benchmarks/results/quickstart.json: wall time (total and the synthetic-data generation part), the
final validation and held-out test metrics, and the machine; and benchmarks/results/quickstart_strip.png (one
held-out clip: ground truth | generated | copy of its first frame). Usage:
`python benchmarks/quickstart.py [--keep DIR] [extra overrides]` (--keep: copy the run folder, bundle included, to DIR).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    overrides = sys.argv[1:]
    keep_run = None
    if overrides[:1] == ["--keep"] and len(overrides) > 1:
        keep_run, overrides = Path(overrides[1]), overrides[2:]
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "ANIPORTRAIT_DATA": f"{work}/data", "ANIPORTRAIT_LOGS": f"{work}/logs"}
        started = time.perf_counter()
        result = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], env=env, capture_output=True,
                                text=True)
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"train.py failed:\n{result.stderr[-4000:]}")
        metrics = {name: float(value) for name, value in
                   re.findall(r"\| ((?:\w+/)?(?:val|test)/\S+)\s*\| ([-\d.e]+) \|", result.stdout)}
        log = next(Path(work, "logs").rglob("train.log")).read_text()
        run_dir = next(Path(work, "logs").rglob("config_resolved.yaml")).parent
        keep = REPO / "benchmarks" / "results" / "quickstart_samples"
        keep.mkdir(parents=True, exist_ok=True)
        for stale in keep.glob("*"):
            stale.unlink()
        for video in sorted(run_dir.glob("samples/*.mp4"))[-2:] + sorted(run_dir.glob("previews/*mouth.png"))[-1:]:
            (keep / video.name).write_bytes(video.read_bytes())
        strips = sorted(run_dir.glob("held_out_strip_*.png"))  # ground truth | generated | copy of the first frame
        if strips:
            (REPO / "benchmarks" / "results" / "quickstart_strip.png").write_bytes(strips[0].read_bytes())
        generation = re.findall(r"synthetic dataset generated in (\d+(?:\.\d+)?) s", log)
        if keep_run is not None:
            shutil.copytree(run_dir, keep_run)
    record = {
        "command": "python train.py " + " ".join(overrides),
        "wall_seconds": round(seconds, 1),
        "synthetic_generation_seconds": float(generation[0]) if generation else None,
        "metrics": metrics,
        "last_line": result.stdout.strip().splitlines()[-1].split(":")[0],
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch_threads": os.environ.get("OMP_NUM_THREADS", "default")},
    }
    out = REPO / "benchmarks" / "results" / "quickstart.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
