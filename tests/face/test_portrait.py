"""Portrait loading: the sample portraits, and the awkward inputs users bring (no face, alpha, grayscale,
EXIF rotation, non-square and tiny-face images, several faces), plus a prepared clip's frame as portrait."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from aniportrait.data.portrait import portrait_from_landmarks_npz
from aniportrait.errors import AniPortraitError
from aniportrait.face.portrait import Portrait, load_portrait, square_face_crop

SHARED = Path(os.environ.get("ANIPORTRAIT_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))
MODEL = SHARED / "samples" / "models" / "face_landmarker_v2_with_blendshapes.task"
IMAGES = SHARED / "samples" / "images"
needs_shared = pytest.mark.skipif(not MODEL.is_file(), reason=f"shared sample media not found at {SHARED}")


def rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def eyes_above_mouth(portrait: Portrait) -> bool:
    xy = portrait.pixel_landmarks()
    eye_y = (xy[33, 1] + xy[263, 1]) / 2  # outer eye corners
    return bool(eye_y < xy[13, 1] and xy[10, 1] < xy[152, 1])  # eyes above the upper lip; forehead above chin


def test_framing_rule_keeps_the_square_inside_the_image() -> None:
    # A big face: the square is the whole short side, centred on the face as far as the image allows.
    assert square_face_crop((600, 1000), (700, 100, 950, 400), crop_scale=2.5) == (400, 0, 1000, 600)
    # A small face: a square of crop_scale x face extent around it.
    assert square_face_crop((2000, 1500), (700, 300, 800, 420), crop_scale=2.5) == (600, 210, 900, 510)


@needs_shared
@pytest.mark.parametrize("name", ["aniportrait_Aragaki.png", "aniportrait_lyl.png", "real3dportrait_Macron.png"])
def test_sample_portraits_load(name: str) -> None:
    portrait = load_portrait(IMAGES / name, size=256, landmarker_model=MODEL)
    assert portrait.image.shape == (256, 256, 3) and portrait.image.dtype == np.uint8
    assert portrait.lmks.shape == (478, 3) and portrait.mesh3d.shape == (468, 3)
    assert portrait.trans_mat.shape == (4, 4) and portrait.blendshapes.shape == (52,)
    assert np.all((portrait.lmks[:, :2] > 0) & (portrait.lmks[:, :2] < 1))
    assert eyes_above_mouth(portrait)


@needs_shared
def test_rgba_portrait_drops_alpha_like_imread(tmp_path: Path) -> None:
    """lyl.png is RGBA: the colour channels are used as stored, the alpha is dropped."""
    path = IMAGES / "aniportrait_lyl.png"
    portrait = load_portrait(path, size=512, landmarker_model=MODEL)
    x0, y0, x1, y1 = portrait.crop_box
    expected = cv2.resize(rgb(path)[y0:y1, x0:x1], (512, 512), interpolation=cv2.INTER_AREA)
    assert np.abs(portrait.image.astype(int) - expected).mean() < 1.0
    rgba = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)
    assert rgba.shape[2] == 4
    from_array = load_portrait(rgba, size=512, landmarker_model=MODEL)
    np.testing.assert_array_equal(from_array.image, portrait.image)


@needs_shared
def test_grayscale_portrait_becomes_rgb(tmp_path: Path) -> None:
    gray = cv2.cvtColor(cv2.imread(str(IMAGES / "aniportrait_Aragaki.png")), cv2.COLOR_BGR2GRAY)
    path = tmp_path / "gray.png"
    cv2.imwrite(str(path), gray)
    portrait = load_portrait(path, size=256, landmarker_model=MODEL)
    assert portrait.image.shape == (256, 256, 3)
    assert np.array_equal(portrait.image[..., 0], portrait.image[..., 1])
    assert eyes_above_mouth(portrait)


@needs_shared
def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    """A phone JPEG stored sideways with EXIF orientation 6 (rotate 90 deg clockwise to view)."""
    from PIL import Image

    upright = Image.open(IMAGES / "aniportrait_Aragaki.png").convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise: the viewer must turn it back
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)
    rotated = load_portrait(path, size=256, landmarker_model=MODEL)
    reference = load_portrait(IMAGES / "aniportrait_Aragaki.png", size=256, landmarker_model=MODEL)
    assert eyes_above_mouth(rotated)
    assert np.abs(rotated.pixel_landmarks() - reference.pixel_landmarks()).mean() < 3.0


@needs_shared
def test_non_square_and_small_face_images_are_framed_around_the_face(tmp_path: Path) -> None:
    face = rgb(IMAGES / "aniportrait_Aragaki.png")  # 590 x 590
    wide = np.full((590, 1400, 3), 40, dtype=np.uint8)
    wide[:, 760:1350] = face
    portrait = load_portrait(wide, size=256, landmarker_model=MODEL)
    x0, y0, x1, y1 = portrait.crop_box
    assert (x1 - x0, y1 - y0) == (590, 590) and 700 <= x0 <= 810  # the full height, around the face
    assert eyes_above_mouth(portrait)

    small = np.full((1500, 2000, 3), 200, dtype=np.uint8)
    small[900:1100, 300:500] = cv2.resize(face, (200, 200), interpolation=cv2.INTER_AREA)
    portrait = load_portrait(small, size=256, landmarker_model=MODEL)
    x0, y0, x1, y1 = portrait.crop_box
    assert x1 - x0 < 600 and 300 <= (x0 + x1) / 2 <= 500 and 900 <= (y0 + y1) / 2 <= 1100
    assert eyes_above_mouth(portrait)


@needs_shared
def test_several_faces_take_the_largest_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    face = rgb(IMAGES / "aniportrait_Aragaki.png")
    group = np.full((600, 1000, 3), 30, dtype=np.uint8)
    group[5:595, 5:595] = face
    group[150:500, 630:980] = cv2.resize(rgb(IMAGES / "real3dportrait_Macron.png"), (350, 350))
    with caplog.at_level(logging.WARNING):
        portrait = load_portrait(group, size=256, landmarker_model=MODEL)
    assert any("faces" in record.getMessage() for record in caplog.records)
    assert portrait.crop_box[0] < 300  # the big face on the left


@needs_shared
def test_no_face_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "wall.png"
    cv2.imwrite(str(path), np.full((300, 400, 3), 128, dtype=np.uint8))
    with pytest.raises(AniPortraitError, match=f"no face found in {path}"):
        load_portrait(path, landmarker_model=MODEL)


def test_unreadable_and_missing_images_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(AniPortraitError, match="not found"):
        load_portrait(tmp_path / "missing.png")
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(AniPortraitError, match="cannot read image"):
        load_portrait(broken)


@needs_shared
def test_portrait_from_a_clip_frame(tmp_path: Path) -> None:
    from aniportrait.data.clip import save_landmarks
    from aniportrait.data.video import read_video, write_video
    from aniportrait.face.landmarks import detect_video

    frames = read_video(SHARED / "samples" / "video" / "mimictalk_German_10s.mp4", np.arange(6))
    frames[4] = 0
    arrays = detect_video(frames, 25.0, MODEL)
    clip = tmp_path / "clips" / "a"
    write_video(clip / "video.mp4", frames, fps=25, preset="ultrafast")
    save_landmarks(clip / "landmarks.npz", arrays)

    portrait = portrait_from_landmarks_npz(clip / "landmarks.npz", frame=2, size=256)
    assert portrait.image.shape == (256, 256, 3)
    np.testing.assert_array_equal(portrait.lmks, arrays["lmks"][2])
    np.testing.assert_array_equal(portrait.trans_mat, arrays["trans_mat"][2])
    expected = cv2.resize(frames[2], (256, 256), interpolation=cv2.INTER_AREA)
    assert np.abs(portrait.image.astype(int) - expected).mean() < 4.0  # H.264 at crf 18
    with pytest.raises(AniPortraitError, match="frame 4 has no detected face"):
        portrait_from_landmarks_npz(clip / "landmarks.npz", frame=4)
    with pytest.raises(AniPortraitError, match="out of range"):
        portrait_from_landmarks_npz(clip / "landmarks.npz", frame=6)
