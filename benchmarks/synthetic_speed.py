"""Synthetic-data generation speed on ONE CPU core (the issue asks for >= 100 frames/s at 256x256).

Pins the process to one core and one thread per library, generates a few clips of the default spec and
reports frames per second for: rasterising only (``FaceRenderer.render``), generating a clip (audio,
ground truth and rendering: ``generate_clip``) and generating plus writing it (H.264 encoding, wav, npz).
Writes benchmarks/results/synthetic_speed.json and prints one line.

    python benchmarks/synthetic_speed.py [--clips 6] [--size 256]
"""

from __future__ import annotations

import os

# One thread everywhere, set before numpy / OpenCV load their thread pools.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from aniportrait.audio.io import write_wav  # noqa: E402
from aniportrait.data.clip import save_landmarks  # noqa: E402
from aniportrait.data.synthetic import SyntheticSpec, generate_clip  # noqa: E402
from aniportrait.data.synthetic.dataset import VIDEO_CRF, VIDEO_PRESET  # noqa: E402
from aniportrait.data.synthetic.expression import build_rig  # noqa: E402
from aniportrait.data.synthetic.identity import make_identity  # noqa: E402
from aniportrait.data.synthetic.render import FaceRenderer  # noqa: E402
from aniportrait.data.video import write_video  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "synthetic_speed.json"


def pin_to_one_core() -> str:
    """Restrict this process to its first allowed CPU; returns a description for the results."""
    cv2.setNumThreads(1)
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity on this platform); libraries single-threaded"
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return f"pinned to CPU {core}; libraries single-threaded"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=6, help="clips to time (one per identity, cycling)")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    pinning = pin_to_one_core()
    spec = SyntheticSpec(size=args.size)
    generate_clip(spec, 0, 0)  # warm-up: imports, the template and cached rig weights

    frames = 0
    seconds = {"render": 0.0, "generate": 0.0, "write": 0.0}
    with tempfile.TemporaryDirectory() as scratch:
        for number in range(args.clips):
            identity, clip = number % spec.identities, number // spec.identities
            start = time.perf_counter()
            generated = generate_clip(spec, identity, clip)
            generated_at = time.perf_counter()
            write_wav(Path(scratch) / "audio.wav", generated.audio, generated.sample_rate)
            write_video(Path(scratch) / "video.mp4", generated.frames, generated.fps, crf=VIDEO_CRF, preset=VIDEO_PRESET)
            save_landmarks(Path(scratch) / "landmarks.npz", generated.landmarks)
            written_at = time.perf_counter()

            person = make_identity(spec.seed, identity)
            renderer = FaceRenderer(person, build_rig(person.neutral_mesh), spec.size)
            arrays = generated.landmarks
            render_start = time.perf_counter()
            rendered = renderer.render(arrays["mesh3d"], arrays["trans_mat"], arrays["jaw_open"])
            seconds["render"] += time.perf_counter() - render_start
            assert np.array_equal(rendered, generated.frames), "rendering is not deterministic"

            frames += len(generated.frames)
            seconds["generate"] += generated_at - start
            seconds["write"] += written_at - generated_at

    fps = {
        "render_only": frames / seconds["render"],
        "generate": frames / seconds["generate"],
        "generate_and_encode": frames / (seconds["generate"] + seconds["write"]),
    }
    results = {
        "benchmark": "synthetic_speed",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "size": spec.size,
        "clips": args.clips,
        "frames": frames,
        "frames_per_second": {key: round(value, 1) for key, value in fps.items()},
        "seconds": {key: round(value, 3) for key, value in seconds.items()},
        "video": {"codec": "libx264", "crf": VIDEO_CRF, "preset": VIDEO_PRESET},
        "target_frames_per_second": 100,
        "machine": {
            "cpu": cpu_model(),
            "cores_visible": os.cpu_count(),
            "threads": pinning,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "opencv": cv2.__version__,
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"synthetic data {spec.size}x{spec.size}, {frames} frames on one core: "
        f"render {fps['render_only']:.0f} fps, generate {fps['generate']:.0f} fps, "
        f"generate+encode {fps['generate_and_encode']:.0f} fps (target >= 100) -> {RESULTS}"
    )


if __name__ == "__main__":
    main()
