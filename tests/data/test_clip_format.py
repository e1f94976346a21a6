"""Clip format: manifest round trip, validation naming the clip, and the dataset checker."""

import json
import shutil

import numpy as np
import pytest

from aniportrait.data.check import check_dataset
from aniportrait.data.check import main as check_main
from aniportrait.data.clip import ClipRecord, Manifest, load_landmarks, save_landmarks, validate_landmarks
from aniportrait.errors import AniPortraitError


def _arrays(frames=5):
    return {
        "lmks": np.zeros((frames, 478, 3), np.float32), "mesh3d": np.zeros((frames, 468, 3), np.float32),
        "trans_mat": np.tile(np.eye(4, dtype=np.float32), (frames, 1, 1)),
        "blendshapes": np.zeros((frames, 52), np.float32), "valid": np.ones(frames, bool),
    }


def test_manifest_round_trip_keeps_extra_fields(tmp_path):
    record = ClipRecord(id="a", split="train", identity="p1", fps=25, frames=10, width=64, height=64, duration_s=0.4,
                        source="x.mp4", video="clips/a/video.mp4", landmarks="clips/a/landmarks.npz",
                        audio="clips/a/audio.wav", extra={"qc_detection_rate": 0.98})
    Manifest(tmp_path, [record]).save()
    loaded = Manifest.load(tmp_path)
    assert loaded.records == [record]
    assert loaded.split("train") == [record] and loaded.identities() == ["p1"]


def test_manifest_errors_name_the_line(tmp_path):
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"id": "a", "split": "holdout"}) + "\n")
    with pytest.raises(AniPortraitError, match="manifest.jsonl:1"):
        Manifest.load(tmp_path)
    with pytest.raises(AniPortraitError, match="not a prepared dataset"):
        Manifest.load(tmp_path / "missing")


@pytest.mark.parametrize("key,bad,message", [
    ("lmks", np.zeros((5, 470, 3), np.float32), "lmks has shape"),
    ("mesh3d", np.zeros((5, 468, 3), np.float64), "dtype"),
    ("valid", np.ones(4, bool), "4 frames"),
])
def test_landmark_validation_names_the_clip(key, bad, message):
    arrays = _arrays()
    arrays[key] = bad
    with pytest.raises(AniPortraitError, match=message) as error:
        validate_landmarks(arrays, "clips/xyz/landmarks.npz")
    assert "clips/xyz" in str(error.value)


def test_landmarks_save_load_round_trip(tmp_path):
    arrays = _arrays()
    arrays["pose6"] = np.ones((5, 6), np.float32)
    save_landmarks(tmp_path / "landmarks.npz", arrays)
    loaded = load_landmarks(tmp_path / "landmarks.npz", frames=5)
    assert set(loaded) == set(arrays) and all(np.array_equal(loaded[k], arrays[k]) for k in arrays)
    with pytest.raises(AniPortraitError, match="manifest says 6"):
        load_landmarks(tmp_path / "landmarks.npz", frames=6)


def test_checker_lists_every_bad_clip(tiny_dataset, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(tiny_dataset, root)
    assert check_dataset(root, progress=False) == {}
    manifest = Manifest.load(root)
    first, second, third = manifest.records[:3]
    arrays = dict(np.load(root / first.landmarks))
    arrays["lmks"] = arrays["lmks"][:, :470]
    np.savez(root / first.landmarks, **arrays)
    (root / second.audio).unlink()
    (root / third.video).write_bytes(b"not a video")
    bad = check_dataset(root, progress=False)
    assert set(bad) == {first.id, second.id, third.id}
    assert "lmks has shape" in bad[first.id][0] and "audio missing" in bad[second.id][0]
    assert check_main([str(root), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert set(report["bad"]) == set(bad)
