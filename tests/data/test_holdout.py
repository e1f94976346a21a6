"""Holding frame ranges back: every clip splits by time into train | gap | val | gap | test parts."""

from __future__ import annotations

import numpy as np
import pytest

from aniportrait.data.clip import Manifest, load_landmarks
from aniportrait.data.holdout import HoldoutSettings, frame_ranges, main, split_frame_ranges
from aniportrait.data.video import read_video
from aniportrait.errors import AniPortraitError


def test_ranges_hold_back_the_end_with_gaps():
    ranges = frame_ranges(100, 25.0, HoldoutSettings(test_fraction=0.2, val_fraction=0.1, gap_seconds=0.2, min_frames=5))
    assert ranges == {"train": range(0, 60), "val": range(65, 75), "test": range(80, 100)}
    assert frame_ranges(20, 25.0, HoldoutSettings(min_frames=16)) is None  # too short for both parts


def test_bad_fractions_are_refused():
    with pytest.raises(AniPortraitError, match="test_fraction"):
        HoldoutSettings(test_fraction=0.7, val_fraction=0.4)


def test_parts_hold_the_source_frames_audio_and_landmarks(tiny_dataset, tmp_path):
    out = tmp_path / "held_out"
    settings = HoldoutSettings(test_fraction=0.3, gap_seconds=0.1, min_frames=8)
    manifest = split_frame_ranges(tiny_dataset, out, settings)
    source = Manifest.load(tiny_dataset)
    long_enough = [record for record in source if frame_ranges(record.frames, record.fps, settings)]
    assert len(manifest.split("train")) == len(manifest.split("test")) == len(long_enough) > 0
    record = next(iter(long_enough))
    ranges = frame_ranges(record.frames, record.fps, settings)
    source_lmks = load_landmarks(tiny_dataset / record.landmarks)["lmks"]
    source_frames = read_video(tiny_dataset / record.video)
    for part in (f"{record.id}-train", f"{record.id}-test"):
        entry = next(r for r in manifest if r.id == part)
        frames = ranges[entry.split]
        assert entry.identity == record.identity and entry.frames == len(frames)
        np.testing.assert_array_equal(load_landmarks(out / entry.landmarks)["lmks"], source_lmks[frames.start:frames.stop])
        video = read_video(out / entry.video)
        assert len(video) == len(frames)
        assert np.abs(video.astype(int) - source_frames[frames.start:frames.stop].astype(int)).mean() < 4  # re-encoded
        assert entry.audio is not None and (out / entry.audio).is_file()


def test_the_command_refuses_an_existing_output(tiny_dataset, tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    assert main([str(tiny_dataset), str(tmp_path / "exists")]) == 2
    assert "exists" in capsys.readouterr().err
