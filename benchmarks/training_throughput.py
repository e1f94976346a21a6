"""Training throughput against the official code, measured side by side (issue 15): one JSON per stage and variant.

The official training steps come from ``../shared/official_bench`` (``run.sh stage1 stage2``, which writes
``official_stage1.json`` / ``official_stage2.json``), ours from ``benchmarks/video_train_step.py`` at the same
batch and resolution (SD-1.5 shapes, 512 px: stage 1 batch 4, stage 2 1 x 16 frames). Ratios only hold when both
sides ran in the same device call on the same GPU; this script checks that the GPU names agree and records the
files it read. On the GPU machine, in one command (the official harness's README says what to carry):

    bash .official_bench/run.sh stage1 stage2
    python benchmarks/video_train_step.py --variants plain,cuda_graphs --checkpointing off --out $OUT/ours.json
    python benchmarks/training_throughput.py --official $OUT/official_stage1.json $OUT/official_stage2.json \\
        --ours $OUT/ours.json

Writes benchmarks/results/training_throughput.json: per stage the official figures and one row per (variant,
gradient checkpointing) of ours with ``samples_per_s``, ``speedup_vs_official``, ``peak_allocated_gib`` against
``official_peak_allocated_gib``, ``warmup_seconds`` and the settings.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "training_throughput.json"


def official_stage(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_text())
    stage = {"stage1": 1, "stage2": 2}.get(document.get("part"))
    if stage is None or not document.get("runs"):
        raise SystemExit(f"{path}: not an official stage1/stage2 result of ../shared/official_bench (part="
                         f"{document.get('part')!r}, runs={len(document.get('runs', []))})")
    run = document["runs"][0]
    setup = document.get("setup", {})
    return {"stage": stage, "file": path.name, "batch": run["batch"], "frames": run["frames"], "size": run["H"],
            "official_seconds_per_step": run["median_step_s"], "official_samples_per_s": run["samples_per_s"],
            "official_peak_allocated_gib": run["memory"]["max_allocated_GiB"],
            "official_settings": {"mixed_precision": setup.get("mixed_precision"),
                                  "gradient_checkpointing": setup.get("gradient_checkpointing"),
                                  "optimizer": setup.get("optimizer")}}


def merge(official: list[Path], ours: list[Path], note: str | None) -> dict[str, Any]:
    stages = {entry["stage"]: entry for entry in map(official_stage, official)}
    gpus, rows = set(), []
    for path in ours:
        document = json.loads(path.read_text())
        gpus.add(document.get("device"))
        for result in document.get("results", []):
            result = {**result, "file": path.name}
            rows.append(result)
    if len(gpus) != 1 or None in gpus:
        raise SystemExit(f"--ours: the results come from {sorted(map(str, gpus))}; one GPU kind is needed")
    output_stages = {}
    for stage, entry in sorted(stages.items()):
        matching = [row for row in rows if row.get("stage") == stage and row.get("status") == "ok"
                    and row.get("batch_size") == entry["batch"] and row.get("frames") == entry["frames"]
                    and row.get("size") == entry["size"]]
        output_stages[f"stage{stage}"] = {**entry, "ours": [{
            "variant": row["variant"], "gradient_checkpointing": row["gradient_checkpointing"],
            "seconds_per_step": row["step_seconds_median"], "samples_per_s": row["samples_per_s"],
            "speedup_vs_official": round(row["samples_per_s"] / entry["official_samples_per_s"], 3),
            "peak_allocated_gib": row.get("peak_allocated_gib"),
            "memory_within_official": (row.get("peak_allocated_gib") or 1e9) <= entry["official_peak_allocated_gib"],
            "warmup_seconds": row.get("compile_and_warmup_seconds"), "precision": row.get("precision"),
            "performance": row.get("performance"), "optimizer": row.get("optimizer"), "file": row["file"],
        } for row in matching]}
        if not matching:
            raise SystemExit(f"--ours has no result at stage {stage}'s official shape (batch {entry['batch']}, "
                             f"{entry['frames']} frames, {entry['size']} px)")
    return {"benchmark": "benchmarks/training_throughput.py", "gpu": gpus.pop(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "note": note,
            "target": "samples_per_s >= 2 x official_samples_per_s with trainer=gpu's settings, warm-up <= 120 s, "
                      "peak memory <= the official's at the same batch",
            "stages": output_stages}


def keep_earlier(previous: dict[str, Any], document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with the stages it did not measure kept from ``previous`` (each with its own call's note and
    date), and the entries it replaces kept, newest first, under ``earlier``: one call's ratio is one machine's."""
    stages = {name: {**entry, "date": entry.get("date", previous.get("date")), "note": entry.get("note", previous.get("note"))}
              for name, entry in previous.get("stages", {}).items()}
    earlier = [{"stage": name, **stages[name]} for name in document["stages"] if name in stages]
    kept = {name: entry for name, entry in stages.items() if name not in document["stages"]}
    fresh = {name: {**entry, "date": document["date"], "note": document["note"]}
             for name, entry in document["stages"].items()}
    return {**document, "stages": {**kept, **fresh}, "earlier": earlier + previous.get("earlier", [])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, nargs="+", required=True, help="official_stage1.json / _stage2.json")
    parser.add_argument("--ours", type=Path, nargs="+", required=True, help="video_train_step.py results")
    parser.add_argument("--note", default=None, help="how the two sides were run (same call? which machine?)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    document = merge(args.official, args.ours, args.note)
    document = keep_earlier(json.loads(args.out.read_text()) if args.out.is_file() else {}, document)
    partial = args.out.with_name(args.out.name + ".partial")
    partial.write_text(json.dumps(document, indent=1) + "\n")
    partial.replace(args.out)
    for name, stage in document["stages"].items():
        for row in stage["ours"]:
            print(f"{name} {row['variant']:>12} checkpointing={row['gradient_checkpointing']!s:5} "
                  f"{row['samples_per_s']:7.2f} samples/s = {row['speedup_vs_official']:.2f}x official "
                  f"({stage['official_samples_per_s']:.2f}), {row['peak_allocated_gib']} GiB "
                  f"(official {stage['official_peak_allocated_gib']})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
