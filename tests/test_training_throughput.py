"""benchmarks/training_throughput.py: the speed-up against the official step is read from both sides' own files,
only at the official shape, and only when our side came from one GPU kind."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import training_throughput  # noqa: E402


def _official(path, part, seconds, batch, frames, memory):
    run = {"batch": batch, "frames": frames, "H": 512, "W": 512, "median_step_s": seconds,
           "samples_per_s": batch / seconds, "memory": {"max_allocated_GiB": memory}}
    path.write_text(json.dumps({"part": part, "setup": {"mixed_precision": "fp16"}, "runs": [run]}))
    return path


def _ours(path, rows, device="NVIDIA H200"):
    path.write_text(json.dumps({"device": device, "results": rows}))
    return path


def _row(stage, variant, seconds, batch, frames, size=512, memory=30.0):
    return {"variant": variant, "stage": stage, "batch_size": batch, "frames": frames, "size": size, "status": "ok",
            "gradient_checkpointing": False, "step_seconds_median": seconds, "samples_per_s": batch / seconds,
            "peak_allocated_gib": memory, "compile_and_warmup_seconds": 3.0}


def test_speedup_is_samples_per_second_against_the_official_at_its_shape(tmp_path):
    official = [_official(tmp_path / "o1.json", "stage1", 0.4, 4, 1, 36.0),
                _official(tmp_path / "o2.json", "stage2", 0.5, 1, 16, 27.0)]
    ours = _ours(tmp_path / "ours.json", [
        _row(1, "plain", 0.5, 4, 1, memory=42.0), _row(1, "cuda_graphs", 0.2, 4, 1),
        _row(1, "cuda_graphs", 0.2, 32, 1, size=256),  # another shape: not compared
        _row(2, "plain", 0.25, 1, 16)])
    document = training_throughput.merge(official, [ours], note=None)
    stage1 = document["stages"]["stage1"]
    assert [row["variant"] for row in stage1["ours"]] == ["plain", "cuda_graphs"]
    assert stage1["ours"][0]["speedup_vs_official"] == pytest.approx(0.8)
    assert stage1["ours"][1]["speedup_vs_official"] == pytest.approx(2.0)
    assert [row["memory_within_official"] for row in stage1["ours"]] == [False, True]
    assert document["stages"]["stage2"]["ours"][0]["speedup_vs_official"] == pytest.approx(2.0)
    assert document["gpu"] == "NVIDIA H200"


def test_results_from_two_gpu_kinds_or_without_the_official_shape_are_refused(tmp_path):
    official = [_official(tmp_path / "o1.json", "stage1", 0.4, 4, 1, 36.0)]
    h200 = _ours(tmp_path / "a.json", [_row(1, "plain", 0.5, 4, 1)])
    h100 = _ours(tmp_path / "b.json", [_row(1, "plain", 0.5, 4, 1)], device="NVIDIA H100 80GB HBM3")
    with pytest.raises(SystemExit, match="one GPU kind"):
        training_throughput.merge(official, [h200, h100], note=None)
    other_shape = _ours(tmp_path / "c.json", [_row(1, "plain", 0.5, 8, 1)])
    with pytest.raises(SystemExit, match="official shape"):
        training_throughput.merge(official, [other_shape], note=None)


def test_a_later_call_keeps_the_stages_it_did_not_measure_and_the_entries_it_replaces():
    previous = {"date": "d1", "note": "call 1", "stages": {"stage1": {"official_samples_per_s": 13.7},
                                                            "stage2": {"official_samples_per_s": 2.0}}}
    fresh = {"date": "d2", "note": "call 2", "stages": {"stage1": {"official_samples_per_s": 8.6}}}
    document = training_throughput.keep_earlier(previous, fresh)
    assert document["stages"]["stage1"] == {"official_samples_per_s": 8.6, "date": "d2", "note": "call 2"}
    assert document["stages"]["stage2"] == {"official_samples_per_s": 2.0, "date": "d1", "note": "call 1"}
    assert document["earlier"] == [{"stage": "stage1", "official_samples_per_s": 13.7, "date": "d1", "note": "call 1"}]
    again = training_throughput.keep_earlier(document, {"date": "d3", "note": "call 3", "stages": {
        "stage1": {"official_samples_per_s": 9.0}}})
    assert [entry["date"] for entry in again["earlier"]] == ["d2", "d1"]  # newest first
