"""Real sample media through the entry points: a prepared dataset trains; portraits may be images; video-driven
landmarks (issue 3 item 5/6)."""

import numpy as np
import pytest
from conftest import run_cli, shared_path
from PIL import Image

from aniportrait.data.prepare import parse_overrides, prepare_dataset
from aniportrait.data.video import probe_video

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def model_path():
    return shared_path("samples", "models", "face_landmarker_v2_with_blendshapes.task")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, model_path):
    videos = tmp_path_factory.mktemp("videos")
    for name in ("sadtalker_WDA_KatieHill_000.mp4", "aniportrait_pose_ref_video.mp4"):
        (videos / name).symlink_to(shared_path("samples", "video", name))
    output = tmp_path_factory.mktemp("prepared") / "dataset"
    prepare_dataset(parse_overrides([f"input={videos}", f"output={output}", "size=128", "max_source_seconds=3.0",
                                     "min_clip_seconds=1.0", f"landmarker_model={model_path}", "progress=false"]))
    return output


def test_train_on_a_prepared_dataset(prepared, tmp_path):
    result = run_cli("train.py", f"data={prepared}", "model=audio2mesh", "trainer.max_steps=20",
                     "trainer.val_check_interval=20", env={"ANIPORTRAIT_LOGS": str(tmp_path / "logs")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("bundle: ")


def test_landmarks_from_an_image_portrait_and_a_driving_video(model_path, tmp_path):
    video = shared_path("samples", "video", "aniportrait_pose_ref_video.mp4")
    image = shared_path("samples", "images", "aniportrait_lyl.png")  # RGBA, not square
    output = tmp_path / "driven.mp4"
    result = run_cli("infer.py", "mode=landmarks", f"video={video}", f"reference={image}", f"output={output}",
                     "size=256", "length=50", f"face.landmarker_model={model_path}", env={"ANIPORTRAIT_LOGS": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    info = probe_video(output)
    assert info.frames == 50 and info.has_audio and (info.width, info.height) == (256, 256) and info.fps == 25
    arrays = np.load(output.with_suffix(".npz"))
    assert arrays["landmarks"].shape == (50, 468, 2)
    inside = (arrays["landmarks"] >= 0) & (arrays["landmarks"] < 256)
    assert inside.mean() > 0.99


def test_audio_driven_landmarks_from_an_image(tiny_bundle, model_path, tmp_path):
    image = shared_path("samples", "images", "real3dportrait_Macron.png")
    audio = shared_path("samples", "audio", "vexpress_short_case_10.mp3")
    output = tmp_path / "speech.mp4"
    result = run_cli("infer.py", f"bundle={tiny_bundle}", f"audio={audio}", f"reference={image}", f"output={output}",
                     "size=128", f"face.landmarker_model={model_path}", env={"ANIPORTRAIT_LOGS": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert probe_video(output).frames == 133  # ceil(4.416 s x 30)


def test_portrait_without_a_face_is_an_error(model_path, tmp_path):
    blank = tmp_path / "wall.png"
    Image.fromarray(np.full((256, 256, 3), 200, np.uint8)).save(blank)
    video = shared_path("samples", "video", "aniportrait_pose_ref_video.mp4")
    output = tmp_path / "never.mp4"
    result = run_cli("infer.py", f"video={video}", f"reference={blank}", f"output={output}",
                     f"face.landmarker_model={model_path}", env={"ANIPORTRAIT_LOGS": str(tmp_path)})
    assert result.returncode == 2
    assert f"no face found in {blank}" in result.stderr
    assert not output.exists()
