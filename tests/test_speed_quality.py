"""benchmarks/speed_quality.py: one row per timed setting and trained model that scored it (the newest call's speed,
the default scored as the teacher), a plot, and an error when nothing has quality figures."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "speed_quality.py"


def _call(date, rows):
    return {"date": date, "gpu": "NVIDIA H200", "rows": [
        {"variant": name, "benchmark_variant": variant, "scheduler": "DDIMScheduler", "steps": steps, "guidance": 3.5,
         "seconds_per_frame": spf, "speedup_vs_official": round(0.48 / spf, 2)} for name, variant, steps, spf in rows]}


def test_table_and_plot(tmp_path):
    speed = {"vs_official": _call("2026-12-04", [("default", "plain", 25, 0.36), ("default_project", "trained_default", 25, 0.22)]),
             "vs_official_earlier": [_call("2026-12-03", [("default", "plain", 25, 0.30), ("student4", "student4", 4, 0.04),
                                                          ("fast_dpm10", "fast_dpm10", 10, 0.09)])]}
    (tmp_path / "inference_speed.json").write_text(json.dumps(speed))
    learning = {"datasets": {"real": {
        "distillation": {"teacher": {"psnr": 20.0, "mouth_lmd": 3.0}, "student_4": {"psnr": 21.0, "psnr_vs_teacher": 29.0}},
        "deep_cache": {"deepcache_2": {"psnr": 19.9, "psnr_vs_teacher": 40.0}}}}}
    (tmp_path / "stage_b_learning_x.json").write_text(json.dumps(learning))
    out = tmp_path / "speed_quality.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--speed", str(tmp_path / "inference_speed.json"),
                           "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = {row["benchmark_variant"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"plain", "trained_default", "student4"}  # fast_dpm10 was never scored on trained weights
    assert rows["plain"]["seconds_per_frame"] == 0.36 and rows["plain"]["psnr"] == 20.0  # newest call; the teacher
    assert rows["plain"]["psnr_vs_default"] is None
    assert rows["trained_default"]["psnr_vs_default"] == 40.0 and rows["trained_default"]["psnr"] == 19.9
    assert rows["student4"]["speedup_vs_official"] == 12.0 and rows["student4"]["model"] == "real, stage_b_learning_x"
    assert out.with_suffix(".png").stat().st_size > 10_000

    (tmp_path / "stage_b_learning_x.json").write_text(json.dumps({"datasets": {"real": {}}}))
    empty = subprocess.run([sys.executable, str(SCRIPT), "--speed", str(tmp_path / "inference_speed.json"),
                            "--out", str(tmp_path / "none.json")], capture_output=True, text=True)
    assert empty.returncode != 0 and "no row has quality figures" in empty.stderr
    assert not (tmp_path / "none.json").exists()
