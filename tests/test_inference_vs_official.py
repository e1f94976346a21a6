"""benchmarks/inference_vs_official.py: rows against the official s/frame of the same call, the default named as
infer.py's, frame-changing settings carry the learning benchmark's quality, and mismatched workloads are refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPT = REPO / "benchmarks" / "inference_vs_official.py"


def _write(path, document):
    path.write_text(json.dumps(document))
    return path


def _run(tmp_path, official, ours, *extra):
    return subprocess.run([sys.executable, str(SCRIPT), "--official", str(official), "--ours", str(ours),
                           "--out", str(tmp_path / "speed.json"), *extra], capture_output=True, text=True)


def test_rows_against_the_official_call(tmp_path):
    official = _write(tmp_path / "official_infer.json", {"part": "infer", "median_s_per_frame": 0.48,
                                                         "video_length": 48, "H": 512, "memory": {"max_allocated_GiB": 7.9}})
    ours = _write(tmp_path / "ours.json", {"device": "NVIDIA H200", "frames": 48, "size": 512, "dtype": "bf16", "results": [
        {"variant": "plain", "scheduler": "DDIMScheduler", "steps": 25, "guidance": 3.5, "seconds_per_frame": 0.36,
         "peak_allocated_gib": 13.2, "context_frames": 16},
        {"variant": "student4", "scheduler": "LCMScheduler", "steps": 4, "guidance": 1.0, "seconds_per_frame": 0.04},
        {"variant": "trained_default", "scheduler": "DDIMScheduler", "steps": 25, "guidance": 3.5, "seconds_per_frame": 0.3}]})
    learning = _write(tmp_path / "learning.json", {"datasets": {"synthetic": {"distillation": {
        "student_4": {"psnr": 21.0, "psnr_vs_teacher": 25.0}}}, "real": {"deep_cache": {
        "deepcache_2": {"psnr": 20.9, "psnr_vs_teacher": 40.5}}}}})
    (tmp_path / "speed.json").write_text(json.dumps({"frames_48": {"kept": True}}))
    done = _run(tmp_path, official, ours, "--gpu", "NVIDIA H200", "--quality", str(learning))
    assert done.returncode == 0, done.stderr
    document = json.loads((tmp_path / "speed.json").read_text())
    assert document["frames_48"] == {"kept": True}  # inference_speed.py's entries stay
    default, student, project = document["vs_official"]["rows"]
    assert project["variant"] == "default_project" and project["changes_frames"]  # a bundle trained here
    assert project["quality"] == {"real": {"source": "benchmarks/results/learning.json", "psnr": 20.9,
                                           "psnr_vs_teacher": 40.5}}
    assert default["variant"] == "default" and default["speedup_vs_official"] == pytest.approx(0.48 / 0.36, abs=0.01)
    assert not default["changes_frames"] and "quality" not in default
    assert student["speedup_vs_official"] == 12.0 and student["changes_frames"]
    assert student["quality"]["synthetic"]["psnr_vs_teacher"] == 25.0 and "real" not in student["quality"]
    assert document["vs_official"]["official_peak_allocated_gib"] == 7.9
    assert default["peak_at_most_official"] is False and student["peak_at_most_official"] is None

    first = document["vs_official"]  # a second call's comparison replaces it; the first is kept as history
    again = _run(tmp_path, official, ours, "--quality", str(learning))
    assert again.returncode == 0, again.stderr
    document = json.loads((tmp_path / "speed.json").read_text())
    assert document["vs_official_earlier"] == [first]


def test_other_gpus_or_workloads_are_refused(tmp_path):
    official = _write(tmp_path / "official_infer.json", {"part": "infer", "median_s_per_frame": 0.48,
                                                         "video_length": 48, "H": 512})
    ours = _write(tmp_path / "ours.json", {"device": "NVIDIA H100", "frames": 48, "size": 512, "results": []})
    done = _run(tmp_path, official, ours, "--gpu", "NVIDIA H200")
    assert done.returncode != 0 and "GPU names differ" in done.stderr
    ours = _write(tmp_path / "ours.json", {"device": "NVIDIA H200", "frames": 64, "size": 512, "results": []})
    done = _run(tmp_path, official, ours)
    assert done.returncode != 0 and "workloads differ" in done.stderr
    assert not (tmp_path / "speed.json").exists()
