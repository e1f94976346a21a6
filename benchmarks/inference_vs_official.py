"""Inference speed against the official pipeline, measured in the same device call (issue 16): one row per setting.

The official side is ``../shared/official_bench`` (``run.sh infer``: pipeline_pose2vid_long, fp16, 48 frames at
512 x 512, 25 DDIM steps, guidance 3.5, writing ``official_infer.json``); ours is
``benchmarks/inference_optimizations.py`` on the same GPU (bf16, random SD-1.5-shaped weights, the same frames,
steps and guidance), writing one result per variant. On the GPU machine, in one command:

    bash .official_bench/run.sh infer
    python benchmarks/inference_optimizations.py --variants plain,auto,student4 --out $OUT/inference_ours.json
    python benchmarks/inference_vs_official.py --official $OUT/official_infer.json --ours $OUT/inference_ours.json \\
        --gpu "$(nvidia-smi --query-gpu=name --format=csv,noheader)"

``variant`` ``default`` is what ``infer.py`` does without flags for the official release weights (the ``plain``
variant: context windows of 16 overlapping by 4, one window per UNet call, the whole UNet at every step: the
``official`` preset), ``default_project`` what it does for a bundle trained here (the ``project`` preset: the fewest
context windows, ``context_frames=auto``, and deep features reused every 2nd step: the ``trained_default`` variant);
the other rows keep their benchmark names. Settings that change the
frames carry their quality figures where the learning benchmark measured them on trained weights (``--quality``:
its ``distillation`` block: the 4-step student and undistilled 4-step DDIM / DPM-Solver against the 25-step
teacher; its ``deep_cache`` block: the teacher's sampler with deep features reused; ``context_windows``: with
``context_frames=auto``); random weights cannot measure quality. Writes the ``vs_official`` entry of
benchmarks/results/inference_speed.json (an earlier call's moves to ``vs_official_earlier``; the other entries are
inference_speed.py's).
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "inference_speed.json"
# our benchmark's variant -> the row name, and which learning-benchmark rows measure its quality
ROW_NAMES = {"plain": "default", "trained_default": "default_project"}
QUALITY_ROWS = {"student4": ("distillation", "student_4"), "student4_compiled": ("distillation", "student_4"),
                "deepcache2": ("deep_cache", "deepcache_2"),
                "trained_default": ("deep_cache", "deepcache_2"), "auto": ("context_windows", "auto_windows")}
SAME_FRAMES = {"plain", "batched"}  # the default's frames (window batching: up to float rounding)


def quality_of(variant: str, paths: list[Path]) -> dict[str, Any] | None:
    """The variant's quality on trained weights, per dataset, from the learning benchmark's results."""
    if variant not in QUALITY_ROWS:
        return None
    section, row = QUALITY_ROWS[variant]
    found: dict[str, Any] = {}
    for path in paths:
        if not path.is_file():
            continue
        for dataset, result in json.loads(path.read_text()).get("datasets", {}).items():
            block = (result.get(section) or {}).get(row)
            if block and dataset not in found:
                found[dataset] = {"source": f"benchmarks/results/{path.name}", **block}
    return found or None


def rows(official: dict[str, Any], ours: dict[str, Any], quality: list[Path]) -> list[dict[str, Any]]:
    reference = official["median_s_per_frame"]
    table = []
    for result in ours["results"]:
        variant = result["variant"]
        row = {"variant": ROW_NAMES.get(variant, variant), "benchmark_variant": variant,
               "scheduler": result.get("scheduler"), "steps": result.get("steps"), "guidance": result.get("guidance"),
               "official_seconds_per_frame": reference, "seconds_per_frame": result["seconds_per_frame"],
               "speedup_vs_official": round(reference / result["seconds_per_frame"], 2),
               "warmup_seconds": result.get("warmup_seconds"), "peak_allocated_gib": result.get("peak_allocated_gib"),
               "settings": {key: result.get(key) for key in ("context_frames", "window_batch", "channels_last",
                                                             "compile", "frame_evaluations_per_step",
                                                             "decode_batch_size")},
               "changes_frames": variant not in SAME_FRAMES}
        measured = quality_of(variant, quality)
        if row["changes_frames"]:
            row["quality"] = measured or "not measured on trained weights"
        table.append(row)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="official_infer.json of run.sh infer")
    parser.add_argument("--ours", type=Path, required=True, help="inference_optimizations.py's results")
    parser.add_argument("--gpu", default=None, help="the GPU's name (checked against ours)")
    parser.add_argument("--quality", type=Path, nargs="*", default=[
        RESULTS.parent / "stage_b_learning_longer_vae.json", RESULTS.parent / "stage_b_learning_graphs.json",
        RESULTS.parent / "stage_b_learning.json"])
    parser.add_argument("--note", default=None, help="how the two sides were run (the device call)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    official, ours = json.loads(args.official.read_text()), json.loads(args.ours.read_text())
    if official.get("part") != "infer":
        raise SystemExit(f"{args.official}: not run.sh infer's result (part={official.get('part')!r})")
    if args.gpu and ours.get("device") != args.gpu:
        raise SystemExit(f"GPU names differ: ours {ours.get('device')!r}, given {args.gpu!r}: ratios need one GPU")
    if ours.get("frames") != official.get("video_length") or ours.get("size") != official.get("H"):
        raise SystemExit(f"workloads differ: ours {ours.get('frames')} frames at {ours.get('size')}, official "
                         f"{official.get('video_length')} at {official.get('H')}")
    document = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if "vs_official" in document:  # an earlier call's comparison is kept, newest first
        document["vs_official_earlier"] = [document["vs_official"], *document.get("vs_official_earlier", [])]
    document["vs_official"] = {
        "gpu": ours.get("device"), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "frames": ours["frames"], "size": ours["size"], "official_seconds_per_frame": official["median_s_per_frame"],
        "official_peak_allocated_gib": (official.get("memory") or {}).get("max_allocated_GiB"),
        "official_dtype": official.get("dtype"), "ours_dtype": ours.get("dtype"), "note": args.note,
        "files": [args.official.name, args.ours.name], "rows": rows(official, ours, args.quality)}
    limit = document["vs_official"]["official_peak_allocated_gib"]
    for row in document["vs_official"]["rows"]:
        row["peak_at_most_official"] = None if limit is None or row["peak_allocated_gib"] is None \
            else row["peak_allocated_gib"] <= limit
    temporary = args.out.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n")
    temporary.replace(args.out)
    for row in document["vs_official"]["rows"]:
        print(f"{row['variant']:>18}: {row['seconds_per_frame']:.4f} s/frame, {row['speedup_vs_official']}x, "
              f"{row['peak_allocated_gib']} GiB")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
