"""benchmarks/window_seams.py: the frame-difference profile across context-window borders (the measured comparison
of the presets' seams; run on a trained bundle by the lead, checked here on synthetic frames and tiny weights)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from official_fixtures import load_models, write_official_bundle

from aniportrait.data.clip import Manifest

sys.path.insert(0, str(REPO / "benchmarks"))
import window_seams  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

WINDOWS = [torch.arange(0, 16), torch.arange(12, 28)]  # 28 frames: borders after frames 11 and 15


def test_a_jump_at_a_window_border_is_a_seam_and_smooth_motion_is_not():
    rng = np.random.default_rng(0)
    smooth = np.stack([np.full((8, 8, 3), 4 * t, np.uint8) for t in range(28)])  # 4 levels a frame, everywhere
    jump = smooth.copy()
    jump[12:] = np.clip(jump[12:].astype(int) + 40, 0, 255).astype(np.uint8)  # a seam where window 2 starts
    noisy = np.clip(smooth + rng.integers(0, 2, smooth.shape), 0, 255).astype(np.uint8)
    seam = window_seams.seam_profile(jump, WINDOWS)
    assert seam["borders"] == [11, 15] and len(seam["frame_difference"]) == 27
    assert seam["seam_ratio"] > 5 and seam["border_excess"] > 15
    calm = window_seams.seam_profile(noisy, WINDOWS)
    assert 0.7 < calm["seam_ratio"] < 1.3 and abs(calm["border_excess"]) < 1.5


def test_the_benchmark_runs_on_a_bundle(tiny_dataset, tmp_path):
    bundle = write_official_bundle(load_models(), tmp_path)
    clip = tiny_dataset / Manifest.load(tiny_dataset).split("test")[0].landmarks
    output = tmp_path / "seams.json"
    window_seams.main(["--bundle", str(bundle), "--reference", str(clip), "--frames", "24", "--steps", "1",
                       "--width", "64", "--height", "64", "--device", "cpu", "--output", str(output)])
    results = json.loads(output.read_text())
    assert results["bundle_sampling"] == "official" and results["frames"] == 24
    official, project = results["presets"]["official"], results["presets"]["project"]
    assert official["windows"] == [[0, 15], [12, 3]]  # the second window wraps around to frames 0-3
    assert project["windows"] == [[0, 15], [8, 23]]  # the last window ends at the last frame
    assert official["borders"] == [3, 11, 15] and project["borders"] == [7, 15]
    for result in (official, project):
        assert len(result["frame_difference"]) == 23 and result["seam_ratio"] > 0
