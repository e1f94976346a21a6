"""FaceLandmarker wrapper: model resolution errors, the metric mesh against the official fixture, VIDEO-mode
landmarks against the reference landmarks of a real clip, and NaN-free filling of frames without a face."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from aniportrait.errors import AniPortraitError
from aniportrait.face import landmarks as landmarks_module
from aniportrait.face.landmarks import (
    FaceLandmarker,
    LandmarkSequence,
    detect_video,
    detect_video_file,
    fill_invalid_frames,
    resolve_landmarker_model,
)
from aniportrait.face.metric import GeometryMetadata, MetricConverter

SHARED = Path(os.environ.get("ANIPORTRAIT_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))
MODEL = SHARED / "samples" / "models" / "face_landmarker_v2_with_blendshapes.task"
needs_shared = pytest.mark.skipif(not MODEL.is_file(), reason=f"shared sample media not found at {SHARED}")


def test_missing_configured_model_names_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(AniPortraitError, match="face.landmarker_model"):
        resolve_landmarker_model(tmp_path / "missing.task")


def test_env_variable_pointing_nowhere_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANIPORTRAIT_FACE_LANDMARKER", str(tmp_path / "nope.task"))
    with pytest.raises(AniPortraitError, match="ANIPORTRAIT_FACE_LANDMARKER"):
        resolve_landmarker_model()


def test_offline_without_model_names_key_and_download_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANIPORTRAIT_FACE_LANDMARKER", raising=False)
    monkeypatch.setattr(landmarks_module, "CACHE_DIR", tmp_path / "cache")

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(landmarks_module.urllib.request, "urlopen", offline)
    with pytest.raises(AniPortraitError) as error:
        resolve_landmarker_model()
    assert "face.landmarker_model" in str(error.value)
    assert landmarks_module.LANDMARKER_URL in str(error.value)
    assert not list((tmp_path / "cache").glob("*")), "a failed download must leave no partial file"


def test_fill_interpolates_inside_and_holds_at_the_ends() -> None:
    values = np.arange(6, dtype=np.float32)[:, None] * np.array([1.0, 10.0], dtype=np.float32)  # (6, 2)
    valid = np.array([False, True, False, False, True, False])
    filled = fill_invalid_frames({"x": values}, valid)["x"]
    expected_first = values[1]
    np.testing.assert_allclose(filled[0], expected_first)  # held before the first valid frame
    np.testing.assert_allclose(filled[2], values[1] + (values[4] - values[1]) / 3)
    np.testing.assert_allclose(filled[3], values[1] + 2 * (values[4] - values[1]) / 3)
    np.testing.assert_allclose(filled[5], values[4])  # held after the last
    np.testing.assert_array_equal(filled[valid], values[valid])


def test_fill_zero_and_no_valid_frame_give_zeros_never_nan() -> None:
    values = np.full((4, 3), np.nan, dtype=np.float32)
    values[1] = 5.0
    valid = np.array([False, True, False, False])
    assert np.all(fill_invalid_frames({"x": values}, valid, "zero")["x"][~valid] == 0)
    assert np.all(fill_invalid_frames({"x": values}, np.zeros(4, dtype=bool))["x"] == 0)
    with pytest.raises(AniPortraitError, match="fill"):
        fill_invalid_frames({"x": values}, valid, "nearest")


@needs_shared
@pytest.mark.parametrize("name", ["Aragaki", "lyl", "solo"])
def test_mesh3d_matches_official_lmks3d(name: str) -> None:
    """The pose-free mesh derived from public outputs equals the patched MediaPipe's lmks3d."""
    fixture = SHARED / "reference" / "fixtures" / "drawing" / "data.npz"
    if not fixture.is_file():
        pytest.skip(f"official drawing fixture not found at {fixture}")
    with np.load(fixture) as data:
        lmks, lmks3d, trans_mat = data[f"{name}.lmks"], data[f"{name}.lmks3d"], data[f"{name}.trans_mat"]
    converter = MetricConverter(GeometryMetadata.from_task_file(MODEL))
    mesh_with_matrix = converter.canonical_mesh(lmks, trans_mat, (512, 512))
    mesh_from_landmarks_only = converter.canonical_mesh(lmks, None, (512, 512))
    assert np.abs(mesh_with_matrix - lmks3d).max() < 1e-3
    assert np.abs(mesh_from_landmarks_only - lmks3d).max() < 1e-3


@needs_shared
def test_image_mode_finds_the_sample_portraits() -> None:
    import cv2

    with FaceLandmarker(MODEL, mode="image") as landmarker:
        for path in sorted((SHARED / "samples" / "images").glob("*.png")):
            image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
            face = landmarker.detect(image)
            assert face is not None, path
            assert face.lmks.shape == (478, 3) and face.mesh3d.shape == (468, 3)
            assert face.trans_mat.shape == (4, 4) and face.blendshapes.shape == (52,)
            assert face.num_faces == 1


@needs_shared
def test_video_mode_matches_reference_landmarks() -> None:
    """VIDEO mode on decoded frames reproduces the shared reference landmarks (made the same way)."""
    from aniportrait.data.video import read_video

    frames = read_video(SHARED / "samples" / "video" / "sadtalker_WDA_KatieHill_000.mp4", np.arange(40))
    arrays = detect_video(frames, fps=25.0, model_path=MODEL)
    with np.load(SHARED / "samples" / "landmarks" / "sadtalker_WDA_KatieHill_000.npz") as reference:
        reference_lmks = reference["lmks"][:40]
    assert arrays["valid"].all()
    assert arrays["lmks"].shape == (40, 478, 3) and arrays["lmks"].dtype == np.float32
    assert arrays["mesh3d"].shape == (40, 468, 3) and arrays["trans_mat"].shape == (40, 4, 4)
    assert arrays["blendshapes"].shape == (40, 52) and arrays["num_faces"].tolist() == [1] * 40
    pixel_error = np.linalg.norm((arrays["lmks"][..., :2] - reference_lmks[..., :2]) * 512, axis=-1).mean()
    assert pixel_error < 0.5, f"mean landmark error {pixel_error:.3f} px at 512x512"


@needs_shared
def test_frames_without_face_are_marked_and_filled() -> None:
    from aniportrait.data.video import read_video

    frames = read_video(SHARED / "samples" / "video" / "mimictalk_German_10s.mp4", np.arange(5))
    frames[2] = 0  # a black frame: no face
    with FaceLandmarker(MODEL, mode="video") as landmarker:
        sequence = LandmarkSequence(landmarker, fps=25.0)
        sequence.extend(frames)
        arrays = sequence.arrays()
    assert arrays["valid"].tolist() == [True, True, False, True, True]
    assert arrays["num_faces"][2] == 0
    for key in ("lmks", "mesh3d", "trans_mat", "blendshapes"):
        assert np.isfinite(arrays[key]).all()
        np.testing.assert_allclose(arrays[key][2], (arrays[key][1] + arrays[key][3]) / 2, rtol=1e-5, atol=1e-6)


@needs_shared
def test_detect_video_file_reads_a_clip_and_rejects_faceless_video(tmp_path: Path) -> None:
    from aniportrait.data.video import write_video

    arrays, fps = detect_video_file(SHARED / "samples" / "video" / "aniportrait_pose_ref_video.mp4", MODEL, max_frames=10)
    assert fps == pytest.approx(25.0) and arrays["valid"].all() and len(arrays["lmks"]) == 10
    blank = tmp_path / "blank.mp4"
    write_video(blank, np.full((6, 64, 64, 3), 90, dtype=np.uint8), fps=25, preset="ultrafast")
    with pytest.raises(AniPortraitError, match="no face found in .*blank.mp4"):
        detect_video_file(blank, MODEL)
