"""Import of the official AniPortrait training layout (frame PNGs, per-frame *_lmks.npy / *_bs.npy, training
JSON) into the clip format, on a small layout made here from a sample video as preprocess_dataset.py would."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from aniportrait.data.clip import Manifest, load_landmarks
from aniportrait.data.official_import import ImportConfig, import_official_dataset, main

SHARED = Path(os.environ.get("ANIPORTRAIT_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))
SAMPLES = SHARED / "samples"
MODEL = SAMPLES / "models" / "face_landmarker_v2_with_blendshapes.task"
FRAMES = 12
MISSING_FRAME = 5  # the official extractor found no face here: no _lmks.npy is written


@pytest.fixture(scope="module")
def official_layout(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """<base>/frames/<video>/NNNN.png, <base>/face_info/<video>/NNNN_{lmks,lmks3d,trans_mat,bs}.npy, train.json."""
    if not MODEL.is_file():
        pytest.skip(f"shared sample media not found at {SHARED}")
    from aniportrait.audio.io import load_audio, write_wav
    from aniportrait.data.video import read_video
    from aniportrait.face.landmarks import FaceLandmarker

    base = tmp_path_factory.mktemp("official")
    video_name = "WDA_KatieHill_000"
    frame_dir, info_dir = base / "frames" / video_name, base / "face_info" / video_name
    frame_dir.mkdir(parents=True)
    info_dir.mkdir(parents=True)
    frames = read_video(SAMPLES / "video" / "sadtalker_WDA_KatieHill_000.mp4", np.arange(FRAMES))
    saved = {}
    with FaceLandmarker(MODEL, mode="image", max_faces=1) as landmarker:
        for index, frame in enumerate(frames):
            name = f"{index:04d}"
            cv2.imwrite(str(frame_dir / f"{name}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            if index == MISSING_FRAME:
                continue
            face = landmarker.detect(frame)
            np.save(info_dir / f"{name}_lmks.npy", face.lmks.astype(np.float32))
            np.save(info_dir / f"{name}_lmks3d.npy", face.mesh3d.astype(np.float32))
            np.save(info_dir / f"{name}_trans_mat.npy", face.trans_mat.astype(np.float32))
            np.save(info_dir / f"{name}_bs.npy", face.blendshapes[1:].astype(np.float32))  # official: _neutral dropped
            saved[index] = face
    # The JSON as generate_training_json_mesh writes it (paths relative to where the script ran).
    frame_paths = sorted(str(p.relative_to(base)) for p in frame_dir.glob("*.png"))
    lmks_paths = sorted(str(p.relative_to(base)) for p in info_dir.glob("*_lmks.npy"))
    table = {video_name: {"video_clip_num": 1, "clip_data_list": [
        {"frame_name_list": [f"{video_name}/{Path(p).name}" for p in frame_paths],
         "frame_path_list": frame_paths, "lmks_list": lmks_paths}]}}
    (base / "train.json").write_text(json.dumps(table))
    audio_dir = base / "audio"
    audio_dir.mkdir()
    write_wav(audio_dir / f"{video_name}.wav", load_audio(SAMPLES / "video" / "sadtalker_WDA_KatieHill_000.mp4"))
    return {"base": base, "video_name": video_name, "frames": frames, "faces": saved, "audio_dir": audio_dir}


@pytest.fixture(scope="module")
def imported(official_layout: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imported")
    status = main([str(official_layout["base"] / "train.json"), str(root), "fps=25", "size=256",
                   f"audio_dir={official_layout['audio_dir']}", f"landmarker_model={MODEL}", "identity=hdtf"])
    assert status == 0
    return root


def test_import_writes_a_valid_clip(official_layout: dict, imported: Path) -> None:
    from aniportrait.data.video import read_video

    manifest = Manifest.load(imported)
    assert len(manifest) == 1
    record = next(iter(manifest))
    assert (record.id, record.identity, record.frames, record.fps) == ("WDA_KatieHill_000_000", "KatieHill", FRAMES, 25.0)
    video = read_video(record.path(imported, "video"))
    assert video.shape == (FRAMES, 256, 256, 3)
    expected = np.stack([cv2.resize(f, (256, 256), interpolation=cv2.INTER_AREA) for f in official_layout["frames"]])
    assert np.abs(video.astype(int) - expected).mean() < 4.0


def test_landmarks_are_paired_by_frame_name_and_missing_frames_marked(official_layout: dict, imported: Path) -> None:
    arrays = load_landmarks(imported / "clips" / "WDA_KatieHill_000_000" / "landmarks.npz", frames=FRAMES)
    valid = np.ones(FRAMES, dtype=bool)
    valid[MISSING_FRAME] = False
    np.testing.assert_array_equal(arrays["valid"], valid)
    for index, face in official_layout["faces"].items():
        np.testing.assert_array_equal(arrays["lmks"][index], face.lmks)  # not shifted by the missing frame
        np.testing.assert_allclose(arrays["mesh3d"][index], face.mesh3d, atol=1e-3)  # recomputed = _lmks3d
        np.testing.assert_allclose(arrays["blendshapes"][index, 1:], face.blendshapes[1:])
        assert arrays["blendshapes"][index, 0] == 0.0
    neighbours = (arrays["lmks"][MISSING_FRAME - 1] + arrays["lmks"][MISSING_FRAME + 1]) / 2
    np.testing.assert_allclose(arrays["lmks"][MISSING_FRAME], neighbours, atol=1e-6)


def test_audio_is_cut_to_the_clip(imported: Path) -> None:
    import soundfile

    samples, rate = soundfile.read(imported / "clips" / "WDA_KatieHill_000_000" / "audio.wav")
    assert rate == 16000 and len(samples) == FRAMES * 16000 // 25


def test_rerun_skips_and_bad_json_is_a_clear_error(official_layout: dict, imported: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    video = imported / "clips" / "WDA_KatieHill_000_000" / "video.mp4"
    stamp = video.stat().st_mtime_ns
    import_official_dataset(ImportConfig(str(official_layout["base"] / "train.json"), str(imported), fps=25, size=256,
                                         landmarker_model=str(MODEL)))
    assert video.stat().st_mtime_ns == stamp
    not_official = tmp_path / "other.json"
    not_official.write_text(json.dumps({"a": [1, 2]}))
    assert main([str(not_official), str(tmp_path / "out"), f"landmarker_model={MODEL}"]) == 2
    assert "not an official AniPortrait training JSON" in capsys.readouterr().err


def test_non_square_frames_are_cropped_and_landmarks_remapped(official_layout: dict, tmp_path: Path) -> None:
    base = tmp_path / "wide"
    video_name = "wide_clip"
    frame_dir, info_dir = base / video_name, base / "info" / video_name
    frame_dir.mkdir(parents=True)
    info_dir.mkdir(parents=True)
    faces = official_layout["faces"]
    frames = official_layout["frames"]
    for index in range(4):
        wide = np.zeros((512, 700, 3), dtype=np.uint8)
        wide[:, 188:] = frames[index]  # the 512 x 512 frame at the right of a wide one
        cv2.imwrite(str(frame_dir / f"{index:04d}.png"), cv2.cvtColor(wide, cv2.COLOR_RGB2BGR))
        lmks = faces[index].lmks.copy()
        lmks[:, 0] = (lmks[:, 0] * 512 + 188) / 700
        lmks[:, 2] *= 512 / 700  # MediaPipe's z scales with the image width
        np.save(info_dir / f"{index:04d}_lmks.npy", lmks)
    table = {video_name: {"video_clip_num": 1, "clip_data_list": [{
        "frame_path_list": [str(p) for p in sorted(frame_dir.glob("*.png"))],
        "lmks_list": [str(p) for p in sorted(info_dir.glob("*_lmks.npy"))]}]}}
    (base / "train.json").write_text(json.dumps(table))
    root = tmp_path / "out"
    import_official_dataset(ImportConfig(str(base / "train.json"), str(root), fps=25, size=256, landmarker_model=str(MODEL)))
    arrays = load_landmarks(root / "clips" / "wide_clip_000" / "landmarks.npz")
    for index in range(4):
        np.testing.assert_allclose(arrays["lmks"][index], faces[index].lmks, atol=1e-5)  # back in the 512 square
        np.testing.assert_allclose(arrays["mesh3d"][index], faces[index].mesh3d, atol=1e-3)
    record = next(iter(Manifest.load(root)))
    assert record.audio is None and record.extra["blendshapes_missing"] is True
