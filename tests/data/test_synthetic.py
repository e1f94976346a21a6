"""The embedded synthetic dataset: determinism, clip format, exact ground truth, the audio -> mouth
relation, identities, resumable caching and manifest splits. Tiny specs keep this file to seconds."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from aniportrait.audio.io import frame_count, load_audio
from aniportrait.data.clip import Manifest, load_landmarks
from aniportrait.data.synthetic import SyntheticSpec, dataset_dir, ensure_synthetic_dataset, generate_clip
from aniportrait.data.video import read_video
from aniportrait.errors import AniPortraitError
from aniportrait.face.geometry import project_points, relative_pose6
from aniportrait.face.topology import BLENDSHAPE_INDEX, LEFT_EYE_POLYGON, RIGHT_EYE_POLYGON

TINY = SyntheticSpec(seed=3, identities=2, clips_per_identity=3, clip_seconds=1.0, size=64)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), TINY, progress=False)


@pytest.fixture(scope="module")
def long_clip():
    """A 4-s clip at 128 px: enough syllables and pauses for statistics."""
    spec = SyntheticSpec(seed=5, identities=1, clips_per_identity=1, clip_seconds=4.0, size=128)
    return spec, generate_clip(spec, 0, 0)


def frame_rms(audio: np.ndarray, frames: int, fps: float, sample_rate: int = 16000) -> np.ndarray:
    """(T,) RMS of the audio samples in each video frame's interval."""
    bounds = np.minimum(np.floor(np.arange(frames + 1) * sample_rate / fps).astype(int), len(audio))
    return np.array([np.sqrt(np.mean(np.square(audio[a:b], dtype=np.float64))) for a, b in zip(bounds, bounds[1:])])


def test_generate_clip_is_deterministic():
    first, second = generate_clip(TINY, 1, 2), generate_clip(TINY, 1, 2)
    np.testing.assert_array_equal(first.frames, second.frames)
    np.testing.assert_array_equal(first.audio, second.audio)
    assert first.landmarks.keys() == second.landmarks.keys()
    for key in first.landmarks:
        np.testing.assert_array_equal(first.landmarks[key], second.landmarks[key], err_msg=key)
    other = generate_clip(TINY, 1, 1)
    assert not np.array_equal(other.audio[:1000], first.audio[:1000]), "clips of one identity must differ"


def test_dataset_is_in_the_clip_format(tiny_dataset: Path):
    manifest = Manifest.load(tiny_dataset)
    assert len(manifest) == TINY.identities * TINY.clips_per_identity
    for record in manifest:
        arrays = load_landmarks(record.path(tiny_dataset, "landmarks"), frames=record.frames)
        assert arrays["valid"].all()
        for key, shape in (("pose6", (6,)), ("mouth_open", ()), ("jaw_open", ()), ("envelope", ()), ("blink", (2,))):
            assert arrays[key].shape == (record.frames, *shape), key
        assert arrays["neutral_mesh"].shape == (468, 3)
        video = read_video(record.path(tiny_dataset, "video"))
        assert video.shape == (record.frames, TINY.size, TINY.size, 3)
        audio = load_audio(record.path(tiny_dataset, "audio"))
        assert frame_count(len(audio), record.fps) == record.frames
        assert (record.frames - 1) / record.fps < len(audio) / 16000 <= record.frames / record.fps
        assert record.duration_s == pytest.approx(len(audio) / 16000)


def test_ground_truth_is_consistent(long_clip):
    spec, clip = long_clip
    arrays = clip.landmarks
    lmks, mesh3d, trans_mat = arrays["lmks"], arrays["mesh3d"], arrays["trans_mat"]
    pixels = project_points(mesh3d, trans_mat, image_size=(spec.size, spec.size))
    assert np.abs(pixels - lmks[:, :468, :2].astype(np.float64) * spec.size).max() < 1e-4
    np.testing.assert_allclose(relative_pose6(trans_mat, trans_mat[0]), arrays["pose6"], atol=2e-3)
    assert 0.0 <= lmks[..., :2].min() and lmks[..., :2].max() <= 1.0, "the face must stay in the frame"
    # z is relative depth: the nose tip is nearer the camera (negative) than the face's mean.
    assert (lmks[:, 4, 2] < 0).all() and np.abs(lmks[:, :468, 2].mean(axis=1)).max() < 1e-5
    # Iris centres sit inside their eye openings while the eyes are open.
    open_eyes = arrays["blink"].max(axis=1) < 0.1
    for centre, polygon in ((468, RIGHT_EYE_POLYGON), (473, LEFT_EYE_POLYGON)):
        contour = lmks[open_eyes][:, list(polygon), :2]
        assert (contour.min(axis=1) < lmks[open_eyes, centre, :2]).all()
        assert (lmks[open_eyes, centre, :2] < contour.max(axis=1)).all()
    # The frames show the face where the landmarks say: skin at the nose, not the background colour.
    nose = np.round(lmks[:, 4, :2] * spec.size).astype(int)
    corner = clip.frames[:, 0, 0].astype(int)
    at_nose = clip.frames[np.arange(len(nose)), nose[:, 1], nose[:, 0]].astype(int)
    assert (np.abs(at_nose - corner).sum(axis=1) > 30).all()


def test_mouth_opening_follows_the_audio_envelope(long_clip):
    spec, clip = long_clip
    arrays = clip.landmarks
    mouth_open = arrays["mouth_open"]
    rms = frame_rms(clip.audio, len(mouth_open), spec.fps)
    correlation = np.corrcoef(rms, mouth_open)[0, 1]
    assert correlation > 0.8
    # No audio/visual lag: shifting the mouth by two frames either way correlates worse.
    for shift in (-2, 2):
        assert np.corrcoef(rms, np.roll(mouth_open, shift))[0, 1] < correlation - 0.05, shift
    silent = rms < 0.02 * rms.max()
    assert silent.sum() >= 5, "a 4-s clip has pauses"
    assert mouth_open[silent].max() < 0.1, "the mouth is closed in pauses"
    assert mouth_open.max() > 1.0, "open vowels open the mouth by centimetres"
    # The documented relation: jaw_open = frame mean of envelope x openness (openness <= 1).
    assert (arrays["jaw_open"] <= arrays["envelope"] + 1e-6).all()
    assert (arrays["jaw_open"][arrays["envelope"] == 0] == 0).all()
    np.testing.assert_array_equal(arrays["blendshapes"][:, BLENDSHAPE_INDEX["jawOpen"]], arrays["jaw_open"])
    assert arrays["blink"].max() > 0.5, "a 4-s clip has a blink"


def test_identities_differ():
    first, second = generate_clip(TINY, 0, 0), generate_clip(TINY, 1, 0)
    shape_change = np.abs(first.landmarks["neutral_mesh"] - second.landmarks["neutral_mesh"]).max()
    assert shape_change > 0.2
    background_change = np.abs(first.frames[0, 0, 0].astype(int) - second.frames[0, 0, 0].astype(int)).sum()
    assert background_change > 15
    same_identity = generate_clip(TINY, 0, 1)
    np.testing.assert_array_equal(first.landmarks["neutral_mesh"], same_identity.landmarks["neutral_mesh"])


def test_manifest_has_splits_and_unique_ids(tiny_dataset: Path):
    manifest = Manifest.load(tiny_dataset)
    ids = [record.id for record in manifest]
    assert len(set(ids)) == len(ids)
    assert {record.split for record in manifest} == {"train", "val", "test"}
    for identity in manifest.identities():
        splits = sorted(record.split for record in manifest if record.identity == identity)
        assert splits == ["test", "train", "val"]
    record = manifest.records[-1]
    assert (record.id, record.split, record.identity, record.source) == ("id01_clip02", "test", "synthetic_01", "synthetic")
    assert record.video == "clips/id01_clip02/video.mp4" and (tiny_dataset / record.audio).is_file()


def test_generation_resumes_where_it_stopped(tiny_dataset: Path, tmp_path: Path):
    copy = dataset_dir(tmp_path, TINY)
    shutil.copytree(tiny_dataset, copy)  # copies keep their modification times
    manifest_text = (copy / "manifest.jsonl").read_text()
    files = sorted(path for path in (copy / "clips").rglob("*") if path.is_file())
    before = {path: path.stat().st_mtime_ns for path in files}
    removed = copy / "clips" / "id00_clip01"
    for path in removed.iterdir():
        path.unlink()
    (copy / "manifest.jsonl").unlink()

    assert ensure_synthetic_dataset(tmp_path, TINY, progress=False) == copy
    assert (copy / "manifest.jsonl").read_text() == manifest_text
    for path in files:
        assert path.is_file()
        regenerated = path.stat().st_mtime_ns != before[path]
        assert regenerated == (path.parent == removed), path


def test_worker_pool_writes_the_same_clips(tiny_dataset: Path, tmp_path: Path):
    pooled = ensure_synthetic_dataset(tmp_path, TINY, workers=2, progress=False)
    for record in Manifest.load(pooled):
        serial = load_landmarks(record.path(tiny_dataset, "landmarks"))
        parallel = load_landmarks(record.path(pooled, "landmarks"))
        for key in serial:
            np.testing.assert_array_equal(serial[key], parallel[key], err_msg=f"{record.id}: {key}")


def test_spec_is_checked_and_hashed_stably(tmp_path: Path):
    assert dataset_dir(tmp_path, SyntheticSpec(clip_seconds=4)) == dataset_dir(tmp_path, SyntheticSpec(clip_seconds=4.0))
    assert dataset_dir(tmp_path, SyntheticSpec(seed=1)) != dataset_dir(tmp_path, SyntheticSpec(seed=2))
    with pytest.raises(AniPortraitError, match="size"):
        SyntheticSpec(size=63)
    with pytest.raises(AniPortraitError, match="fps"):
        SyntheticSpec(fps=29.97)
    with pytest.raises(AniPortraitError, match="identity=2"):
        generate_clip(TINY, 2, 0)
