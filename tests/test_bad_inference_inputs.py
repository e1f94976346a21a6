"""Bad and awkward inputs to generation: portraits (no face, several faces, RGBA, grayscale, EXIF rotation,
non-square, huge), audio (silent, shorter than a frame, ten minutes with bounded memory, corrupt), corrupt media and
output paths; errors are one line naming the input and the fix, exit status 2, and no partial mp4 is ever left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile
from conftest import REPO, run_cli, shared_path
from PIL import Image

from aniportrait.api import AniPortrait
from aniportrait.data.clip import Manifest
from aniportrait.data.portrait import portrait_from_landmarks_npz
from aniportrait.data.video import probe_video
from aniportrait.errors import AniPortraitError
from aniportrait.inference import (
    AnimationOptions,
    LandmarkPoseFrames,
    generate_video,
    load_reference,
    pose_frames_from_file,
)
from aniportrait.pipelines.presets import SAMPLING_PRESETS

pytestmark = pytest.mark.filterwarnings("ignore")

FOREHEAD, CHIN = 10, 152  # MediaPipe face-mesh indices


@pytest.fixture(scope="module")
def model_path() -> Path:
    return shared_path("samples", "models", "face_landmarker_v2_with_blendshapes.task")


@pytest.fixture(scope="module")
def macron() -> np.ndarray:
    return np.asarray(Image.open(shared_path("samples", "images", "real3dportrait_Macron.png")).convert("RGB"))


@pytest.fixture(scope="module")
def clip_npz(tiny_dataset) -> Path:
    return tiny_dataset / Manifest.load(tiny_dataset).split("test")[0].landmarks


@pytest.fixture()
def ap(tiny_bundle) -> AniPortrait:
    return AniPortrait.from_pretrained(tiny_bundle, device="cpu")


def _upright(portrait) -> bool:
    """Forehead above chin, roughly vertical: the face is the right way up."""
    (fx, fy), (cx, cy) = portrait.lmks[FOREHEAD, :2], portrait.lmks[CHIN, :2]
    return cy - fy > 0.2 and abs(cx - fx) < 0.1


def _portrait_files(folder: Path, rgb: np.ndarray) -> dict[str, Path]:
    """The same face as RGBA, grayscale, EXIF-rotated JPEG, a tall non-square canvas and a huge image."""
    image = Image.fromarray(rgb)
    files = {name: folder / f"{name}.{suffix}" for name, suffix in
             (("rgba", "png"), ("gray", "png"), ("exif", "jpg"), ("tall", "png"), ("huge", "png"))}
    image.convert("RGBA").save(files["rgba"])
    image.convert("L").save(files["gray"])
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": store the picture turned the other way
    image.transpose(Image.Transpose.ROTATE_90).save(files["exif"], exif=exif)
    tall = np.zeros((900, 512, 3), np.uint8)
    tall[200:712] = rgb
    Image.fromarray(tall).save(files["tall"])
    Image.fromarray(cv2.resize(rgb, (3000, 3000), interpolation=cv2.INTER_CUBIC)).save(files["huge"])
    return files


def test_awkward_portraits_are_framed_upright_and_square(macron, model_path, tmp_path):
    for name, path in _portrait_files(tmp_path, macron).items():
        portrait = load_reference(path, size=128, landmarker_model=str(model_path))
        assert portrait.image.shape == (128, 128, 3), name
        assert _upright(portrait), name
        x0, y0, x1, y1 = portrait.crop_box
        assert x1 - x0 == y1 - y0, name  # a square crop of the (upright) source, never padded
    sideways = np.rot90(macron).copy()  # no EXIF: a sideways face stays sideways (so the EXIF case above is meaningful)
    assert not _upright(load_reference(_saved(tmp_path / "sideways.png", sideways), size=128,
                                       landmarker_model=str(model_path)))


def _saved(path: Path, rgb: np.ndarray) -> Path:
    Image.fromarray(rgb).save(path)
    return path


def test_several_faces_take_the_largest_with_a_warning(macron, model_path, tmp_path, caplog):
    small = cv2.resize(macron, (256, 256), interpolation=cv2.INTER_AREA)
    group = np.zeros((512, 768 + 64, 3), np.uint8)
    group[:, :512] = macron
    group[128:384, 576:] = small
    portrait = load_reference(_saved(tmp_path / "two.png", group), size=128, landmarker_model=str(model_path))
    assert "shows 2 faces; the largest is used" in caplog.text
    assert portrait.crop_box[2] <= 560  # framed on the large face on the left


def test_short_silent_and_sub_frame_audio_are_valid(ap, clip_npz, tmp_path):
    for name, samples, frames in (("silent", np.zeros(16000), 30), ("blip", np.full(100, 0.1), 1)):
        soundfile.write(tmp_path / f"{name}.wav", samples, 16000)
        output = tmp_path / "new" / "folder" / f"{name}.mp4"  # missing folders are created
        result = ap.landmarks(image_path=clip_npz, audio_path=tmp_path / f"{name}.wav", output_path=output, size=64,
                              progress=False)
        info = probe_video(output)
        assert result.frames == info.frames == frames and info.has_audio, name


LONG_AUDIO_DRIVER = """
import json, resource, sys
from aniportrait.api import AniPortrait
ap = AniPortrait.from_pretrained(sys.argv[1], device="cpu")
peaks = []
for audio, output in ((sys.argv[2], sys.argv[4]), (sys.argv[3], sys.argv[5])):
    result = ap.landmarks(image_path=sys.argv[6], audio_path=audio, output_path=output, size=128, progress=False)
    peaks.append((result.frames, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
print(json.dumps(peaks))
"""


@pytest.mark.slow  # minutes on 2 cores: pytest -m slow
def test_ten_minutes_of_speech_stream_with_bounded_memory(tiny_bundle, clip_npz, tmp_path):
    """Ten minutes at 30 fps is 18,000 frames: held in memory their 128 x 128 pose images alone would take 880 MB
    more than three seconds do; streamed, only per-frame meshes, poses and landmarks grow (~20 KB a frame)."""
    time = np.arange(16000 * 600) / 16000
    speech = (0.2 * np.sin(2 * np.pi * 150 * time) * (np.sin(2 * np.pi * 2 * time) > 0)).astype(np.float32)
    soundfile.write(tmp_path / "long.wav", speech, 16000)
    soundfile.write(tmp_path / "short.wav", speech[: 16000 * 3], 16000)
    result = subprocess.run([sys.executable, "-c", LONG_AUDIO_DRIVER, str(tiny_bundle), str(tmp_path / "short.wav"),
                             str(tmp_path / "long.wav"), str(tmp_path / "short.mp4"), str(tmp_path / "long.mp4"),
                             str(clip_npz)], capture_output=True, text=True, cwd=REPO, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (short_frames, short_peak), (long_frames, long_peak) = json.loads(result.stdout.strip().splitlines()[-1])
    assert (short_frames, long_frames) == (90, 18000) and probe_video(tmp_path / "long.mp4").frames == 18000
    assert long_peak - short_peak < 700, f"peak RSS grew by {long_peak - short_peak:.0f} MB"


def _one_error_line(result) -> str:
    errors = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def test_corrupt_media_and_faceless_portraits_are_one_clear_error(tiny_bundle, clip_npz, model_path, tmp_path):
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(500))
    _saved(tmp_path / "wall.png", np.full((256, 256, 3), 200, np.uint8))
    soundfile.write(tmp_path / "speech.wav", np.zeros(8000), 16000)
    output = tmp_path / "out" / "never.mp4"
    cases = [
        (["mode=landmarks", f"video={tmp_path / 'corrupt.mp4'}", f"reference={clip_npz}"], "corrupt.mp4"),
        (["mode=landmarks", f"audio={tmp_path / 'speech.wav'}", f"reference={tmp_path / 'corrupt.png'}"],
         "cannot read image"),
        (["mode=landmarks", f"audio={tmp_path / 'speech.wav'}", f"reference={tmp_path / 'wall.png'}"],
         f"no face found in {tmp_path / 'wall.png'}"),
        (["mode=audio", f"audio={tmp_path / 'speech.wav'}", f"reference={clip_npz}"], "has no reference_unet"),
    ]
    for args, named in cases:
        result = run_cli("infer.py", *args, f"bundle={tiny_bundle}", f"output={output}",
                         f"face.landmarker_model={model_path}", env={"ANIPORTRAIT_LOGS": str(tmp_path / "logs")})
        assert named in _one_error_line(result), (args, result.stderr[-2000:])
        assert not output.exists() and not list(output.parent.glob("*"))


def test_corrupt_audio_and_pose_files_name_the_file(ap, clip_npz, tmp_path):
    (tmp_path / "noise.wav").write_bytes(b"RIFF" + os.urandom(2000))
    with pytest.raises(AniPortraitError, match="noise.wav"):
        ap.landmarks(image_path=clip_npz, audio_path=tmp_path / "noise.wav", output_path=tmp_path / "x.mp4")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(AniPortraitError, match="other.npz holds \\['weights'\\]; a pose .npz is"):
        pose_frames_from_file(tmp_path / "other.npz", (64, 64), AnimationOptions(), 30.0)
    assert not list(tmp_path.glob("*.mp4"))


def test_output_that_cannot_be_written_is_refused_before_any_work(tiny_bundle, clip_npz, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    soundfile.write(tmp_path / "speech.wav", np.zeros(8000), 16000)
    result = run_cli("infer.py", "mode=landmarks", f"bundle={tiny_bundle}", f"audio={tmp_path / 'speech.wav'}",
                     f"reference={clip_npz}", f"output={tmp_path / 'a_file' / 'out.mp4'}",
                     env={"ANIPORTRAIT_LOGS": str(tmp_path / "logs")})
    assert "cannot create the output folder" in _one_error_line(result)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(AniPortraitError, match="cannot write into"):
            AniPortrait.from_pretrained(tiny_bundle).landmarks(image_path=clip_npz, audio_path=tmp_path / "speech.wav",
                                                               output_path=locked / "out.mp4")


class FailingPipeline:
    """Stage B that fails on its second chunk, after the first chunk's frames were written."""

    video_settings: dict = {}
    preset = SAMPLING_PRESETS["project"]

    def __init__(self):
        self.calls = 0

    def frames(self, reference_image, pose_images, reference_pose, **kwargs):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("CUDA out of memory")
        yield np.zeros((len(pose_images), 64, 64, 3), np.uint8)


def test_a_failure_mid_video_leaves_no_partial_mp4(clip_npz, tmp_path):
    portrait = portrait_from_landmarks_npz(clip_npz, size=64)
    poses = LandmarkPoseFrames(np.repeat(portrait.lmks[None, :468, :2], 30, axis=0), (64, 64))
    pipeline = FailingPipeline()
    with pytest.raises(RuntimeError, match="out of memory"):
        generate_video(pipeline, portrait, poses, tmp_path / "video.mp4", 30.0, None,
                       AnimationOptions(width=64, height=64, chunk_frames=10, chunk_overlap=2, progress=False))
    assert pipeline.calls == 2 and list(tmp_path.iterdir()) == []
