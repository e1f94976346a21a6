"""Speed against quality for every inference setting that has both (issue 16): a table and a plot.

Speed: the rows of ``benchmarks/results/inference_speed.json`` (``vs_official``, then the earlier calls under
``vs_official_earlier``; per benchmark variant the newest call that timed it), each a ratio against the official
pipeline in the same device call on one GPU. Quality: what ``inference_vs_official.py --quality`` attached to those
rows from the learning benchmark (trained ``backbone=small`` models: PSNR against the 25-step DDIM frames of the same
model and seed, and PSNR / mouth-landmark distance against ground truth on held-out clips). The default row (the
official preset's sampler) is the reference those are measured against: its quality is the teacher's.

    python benchmarks/speed_quality.py      # writes results/speed_quality.json and results/speed_quality.png

Random weights time the settings and trained small models score them, so a point pairs the speed of SD-1.5 shapes
with the quality measured at 256 px; the plot says so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from inference_vs_official import quality_of

from aniportrait.utils.atomic import atomic_path

RESULTS = Path(__file__).parent / "results"
OPT_IN_DB = 0.5  # the rule: a switch that costs more than this against the default's frames stays opt-in


def newest_rows(speed: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per benchmark variant, from the newest call that timed it (calls are kept newest first)."""
    seen: dict[str, dict[str, Any]] = {}
    for call in [speed["vs_official"], *speed.get("vs_official_earlier", [])]:
        for row in call["rows"]:
            seen.setdefault(row["benchmark_variant"], {**row, "date": call.get("date"), "gpu": call.get("gpu")})
    return list(seen.values())


def teacher_quality(path: Path) -> dict[str, Any]:
    """The 25-step teacher's figures (the default sampler on the trained model), per dataset, of a learning result."""
    found = {}
    for dataset, result in json.loads(path.read_text()).get("datasets", {}).items():
        for section in ("distillation", "deep_cache", "context_windows"):
            teacher = (result.get(section) or {}).get("teacher")
            if teacher and dataset not in found:
                found[dataset] = {"source": f"benchmarks/results/{path.name}", **teacher}
    return found


def table(speed: dict[str, Any], learning: list[Path]) -> list[dict[str, Any]]:
    """One row per (timed setting, trained model and dataset that scored it)."""
    out = []
    for row in newest_rows(speed):
        for path in learning:
            quality = (teacher_quality(path) if row["benchmark_variant"] == "plain"
                       else quality_of(row["benchmark_variant"], [path])) or {}
            for dataset, block in quality.items():
                out.append({"variant": row["variant"], "benchmark_variant": row["benchmark_variant"],
                            "scheduler": row["scheduler"], "steps": row["steps"], "guidance": row["guidance"],
                            "seconds_per_frame": row["seconds_per_frame"],
                            "speedup_vs_official": row["speedup_vs_official"],
                            "peak_allocated_gib": row.get("peak_allocated_gib"), "speed_date": row["date"],
                            "gpu": row["gpu"], "model": f"{dataset}, {path.stem}", "quality_source": block["source"],
                            "psnr": block.get("psnr"), "ssim": block.get("ssim"), "mouth_lmd": block.get("mouth_lmd"),
                            "psnr_vs_default": block.get("psnr_vs_teacher")})
    return sorted(out, key=lambda r: (r["model"], r["speedup_vs_official"]))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Left: PSNR against ground truth relative to the same model's default (the opt-in rule's line at -0.5 dB).
    Right: PSNR against the default's own frames. x: the speed-up against the official pipeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    labelled: set[str] = set()
    for model in sorted({row["model"] for row in rows}):
        points = [row for row in rows if row["model"] == model]
        reference = next((p for p in points if p["benchmark_variant"] == "plain"), None)
        if reference is None:
            continue
        x = [p["speedup_vs_official"] for p in points]
        left.plot(x, [p["psnr"] - reference["psnr"] for p in points], "o", label=f"{model} ({reference['psnr']:.2f} dB)")
        scored = [p for p in points if p["psnr_vs_default"]]
        right.plot([p["speedup_vs_official"] for p in scored], [p["psnr_vs_default"] for p in scored], "o", label=model)
        for p in points:
            if p["benchmark_variant"] not in labelled:
                labelled.add(p["benchmark_variant"])
                left.annotate(f"{p['benchmark_variant']} ({p['steps']} steps)", (p["speedup_vs_official"],
                              p["psnr"] - reference["psnr"]), textcoords="offset points", fontsize=7, rotation=20,
                              xytext=(4, 6 if len(labelled) % 2 else -16))  # alternate: neighbours do not overlap
    left.axhline(-OPT_IN_DB, color="grey", linestyle="--", linewidth=0.8)
    left.set_ylabel("PSNR against ground truth minus the default's (dB)")
    right.set_ylabel("PSNR against the default's frames (dB)")
    for axis in (left, right):
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(FixedLocator([1, 1.5, 2, 3, 5, 10, 15]))
        axis.xaxis.set_minor_locator(NullLocator())
        axis.set_xticklabels(["1x", "1.5x", "2x", "3x", "5x", "10x", "15x"])
        axis.set_xlabel(f"speed-up against the official pipeline ({rows[0]['gpu']}, 48 frames)")
        axis.legend(fontsize=7, loc="lower left")
    figure.suptitle("Inference settings: speed at SD-1.5 shapes (random weights, one GPU call each) against quality "
                    f"on trained small models (held-out real clips); dashed: default - {OPT_IN_DB} dB", fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120, format="png")
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", type=Path, default=RESULTS / "inference_speed.json")
    parser.add_argument("--learning", type=Path, nargs="+", default=None,
                        help="learning-benchmark results that score settings (default: every stage_b_learning*.json "
                             "beside --speed with distillation / deep-cache / window rows)")
    parser.add_argument("--out", type=Path, default=RESULTS / "speed_quality.json")
    args = parser.parse_args()
    learning = args.learning or sorted(args.speed.parent.glob("stage_b_learning*.json"))
    rows = table(json.loads(args.speed.read_text()), learning)
    if not rows:
        raise SystemExit(f"{args.speed}: no row has quality figures; run inference_vs_official.py --quality first")
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(json.dumps({"benchmark": "benchmarks/speed_quality.py", "source": args.speed.name,
                                         "opt_in_rule_db": OPT_IN_DB, "rows": rows}, indent=1) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    for row in rows:
        print(f"{row['model']:>28} {row['benchmark_variant']:>16} {row['speedup_vs_official']:>6.2f}x  "
              f"psnr {row['psnr']:.2f}  vs default {row['psnr_vs_default'] or '-'}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
