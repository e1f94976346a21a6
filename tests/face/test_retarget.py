"""Video-driven retargeting: identity (a portrait driving itself), expression transfer arithmetic, the three
pose modes with the official template cycling, smoothing, and errors for unusable driving data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from aniportrait.errors import AniPortraitError
from aniportrait.face.geometry import pose6_to_matrix, project_points, relative_pose6
from aniportrait.face.portrait import Portrait, load_portrait
from aniportrait.face.retarget import cycle_pose_template, load_pose_template, retarget
from aniportrait.face.template import load_face_template

SHARED = Path(os.environ.get("ANIPORTRAIT_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))
MODEL = SHARED / "samples" / "models" / "face_landmarker_v2_with_blendshapes.task"
needs_shared = pytest.mark.skipif(not MODEL.is_file(), reason=f"shared sample media not found at {SHARED}")

# A face 60 cm in front of MediaPipe's camera, turned a little: a plausible portrait camera.
PORTRAIT_TRANS = np.asarray(pose6_to_matrix(np.array([5.0, -8.0, 2.0, 0.5, -1.0, -60.0])), dtype=np.float32)


@pytest.fixture
def template_portrait() -> Portrait:
    mesh = load_face_template().mesh
    return Portrait(np.zeros((256, 256, 3), np.uint8), np.zeros((478, 3), np.float32), mesh, PORTRAIT_TRANS,
                    np.zeros(52, np.float32))


def synthetic_driver(frames: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """A driver with its own face, expression offsets and head motion."""
    rng = np.random.default_rng(seed)
    base = load_face_template().mesh * 1.05 + 0.2
    offsets = rng.normal(0.0, 0.1, (frames, 468, 3))
    poses = np.cumsum(rng.normal(0.0, 1.0, (frames, 6)), axis=0) * [1, 1, 1, 0.1, 0.1, 0.1]
    start = pose6_to_matrix(np.array([0.0, 10.0, 0.0, 2.0, 0.0, -50.0]))
    return {
        "mesh3d": (base + offsets).astype(np.float32),
        "trans_mat": (start @ pose6_to_matrix(poses)).astype(np.float32),
        "valid": np.ones(frames, dtype=bool),
        "blendshapes": rng.uniform(0, 1, (frames, 52)).astype(np.float32),
    }


def test_expression_is_the_driver_offset_from_its_reference_frame(template_portrait: Portrait) -> None:
    driver = synthetic_driver()
    result = retarget(template_portrait, driver)
    expected = template_portrait.mesh3d + (driver["mesh3d"] - driver["mesh3d"][0])
    np.testing.assert_allclose(result.meshes, expected, atol=1e-5)
    assert result.expression_reference == 0
    np.testing.assert_allclose(result.meshes[0], template_portrait.mesh3d, atol=1e-6)


def test_driver_pose_is_relative_to_its_first_valid_frame(template_portrait: Portrait) -> None:
    driver = synthetic_driver()
    driver["valid"][:2] = False
    result = retarget(template_portrait, driver, pose="driver", image_size=(256, 320))
    np.testing.assert_allclose(result.poses, relative_pose6(driver["trans_mat"], driver["trans_mat"][2]), atol=1e-4)
    assert result.expression_reference == 2
    np.testing.assert_allclose(result.poses[2], 0.0, atol=1e-4)
    assert result.landmarks_2d.shape == (12, 468, 2) and result.image_size == (256, 320)
    expected = project_points(result.meshes, PORTRAIT_TRANS, result.poses, (256, 320))
    np.testing.assert_allclose(result.landmarks_2d, expected, atol=1e-6)


def test_portrait_pose_keeps_the_head_still(template_portrait: Portrait) -> None:
    driver = synthetic_driver()
    result = retarget(template_portrait, driver, pose="portrait")
    assert np.all(result.poses == 0)
    still = retarget(template_portrait, {**driver, "mesh3d": np.repeat(driver["mesh3d"][:1], 12, axis=0)}, pose="portrait")
    assert np.ptp(still.landmarks_2d, axis=0).max() < 1e-6  # no expression change, no motion: a frozen face


def test_pose_template_is_mirrored_and_cycled_like_the_official_audio2vid(template_portrait: Portrait, tmp_path: Path) -> None:
    template = np.arange(5, dtype=np.float64)[:, None] * np.ones((1, 6))  # poses 0, 1, 2, 3, 4
    order = [0, 1, 2, 3, 4, 3, 2, 1, 0, 1, 2, 3]
    np.testing.assert_array_equal(cycle_pose_template(template, 12)[:, 0], order)
    path = tmp_path / "pose_temp.npy"
    np.save(path, template)
    result = retarget(template_portrait, synthetic_driver(), pose="template", pose_template=path)
    np.testing.assert_array_equal(result.poses[:, 0], order)
    smoothed = retarget(template_portrait, synthetic_driver(), pose="template", pose_template=path, pose_smooth_window=3)
    assert smoothed.poses[4, 0] == pytest.approx((3 + 4 + 3) / 3)


def test_bad_pose_inputs_are_clear_errors(template_portrait: Portrait, tmp_path: Path) -> None:
    driver = synthetic_driver()
    with pytest.raises(AniPortraitError, match="pose_template"):
        retarget(template_portrait, driver, pose="template")
    with pytest.raises(AniPortraitError, match="pose must be one of"):
        retarget(template_portrait, driver, pose="sway")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((10, 3)))
    with pytest.raises(AniPortraitError, match=r"\(N, 6\)"):
        load_pose_template(bad)
    with pytest.raises(AniPortraitError, match="not found"):
        load_pose_template(tmp_path / "missing.npy")


def test_expression_reference_choices(template_portrait: Portrait) -> None:
    driver = synthetic_driver()
    driver["blendshapes"][7, 1:] = 0.0  # the most neutral frame
    assert retarget(template_portrait, driver, expression_reference="neutral").expression_reference == 7
    assert retarget(template_portrait, driver, expression_reference=4).expression_reference == 4
    driver["valid"][5] = False
    with pytest.raises(AniPortraitError, match="not a valid driving frame"):
        retarget(template_portrait, driver, expression_reference=5)
    with pytest.raises(AniPortraitError, match="no frame with a detected face"):
        retarget(template_portrait, {**driver, "valid": np.zeros(12, dtype=bool)})


@needs_shared
def test_portrait_driving_itself_gives_back_its_landmarks() -> None:
    portrait = load_portrait(SHARED / "samples" / "images" / "aniportrait_Aragaki.png", size=512, landmarker_model=MODEL)
    driving = {key: value[None] for key, value in
               {"mesh3d": portrait.mesh3d, "trans_mat": portrait.trans_mat, "blendshapes": portrait.blendshapes}.items()}
    for pose in ("driver", "portrait"):
        result = retarget(portrait, driving, pose=pose)
        error = np.abs(result.landmarks_2d[0] - portrait.pixel_landmarks()[:468]).max()
        assert error < 0.05, f"pose={pose}: {error:.4f} px"


@needs_shared
def test_real_driving_video_moves_the_portrait_like_the_driver() -> None:
    from aniportrait.face.landmarks import detect_video_file

    portrait = load_portrait(SHARED / "samples" / "images" / "real3dportrait_Macron.png", size=256, landmarker_model=MODEL)
    driving, fps = detect_video_file(SHARED / "samples" / "video" / "sadtalker_WDA_KatieHill_000.mp4", MODEL, max_frames=50)
    result = retarget(portrait, driving, pose="driver", pose_smooth_window=5)
    assert result.landmarks_2d.shape == (50, 468, 2) and np.isfinite(result.landmarks_2d).all()
    # The first frame is the portrait itself (reference expression, zero motion before smoothing).
    raw = retarget(portrait, driving, pose="driver")
    assert np.abs(raw.landmarks_2d[0] - portrait.pixel_landmarks()[:468]).max() < 0.05
    # The driver turns its head (yaw up to ~20 deg in this clip); the poses follow its trans_mat.
    expected_yaw = relative_pose6(driving["trans_mat"], driving["trans_mat"][0])[:, 1]
    np.testing.assert_allclose(raw.poses[:, 1], expected_yaw, atol=1e-3)
    assert np.ptp(raw.poses[:, 1]) > 2.0
    assert np.abs(np.diff(result.poses, axis=0)).max() <= np.abs(np.diff(raw.poses, axis=0)).max()
    # The face stays inside the image.
    assert result.landmarks_2d.min() > 0 and result.landmarks_2d.max() < 256
