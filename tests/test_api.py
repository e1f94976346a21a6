"""The Python API: `from aniportrait import AniPortrait`, its two swap points, batches and the default weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli, shared_path

from aniportrait import AniPortrait
from aniportrait.api import ProcessedAudio
from aniportrait.audio.io import load_audio
from aniportrait.data.clip import Manifest
from aniportrait.data.video import probe_video, read_video, write_video
from aniportrait.errors import AniPortraitError
from aniportrait.pipelines.landmarks import LandmarkPrediction

pytestmark = pytest.mark.filterwarnings("ignore")

FAST = {"steps": 2, "progress": False}


@pytest.fixture(scope="module")
def clip(tiny_dataset) -> tuple[Path, Path]:
    record = Manifest.load(tiny_dataset).split("test")[0]
    return tiny_dataset / record.audio, tiny_dataset / record.landmarks


@pytest.fixture()
def ap(full_bundle) -> AniPortrait:
    return AniPortrait.from_pretrained(full_bundle, device="cpu")


def test_import_is_cheap_and_exports_the_api():
    code = ("import sys, aniportrait; heavy = {'torch', 'diffusers', 'transformers'} & set(sys.modules); "
            "assert not heavy, heavy; from aniportrait import AniPortrait; print(AniPortrait.__module__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == "aniportrait.api", result.stderr


def test_animate_and_animate_from_video(ap, clip, tmp_path, capsys):
    audio, reference = clip
    result = ap.animate(image_path=reference, audio_path=audio, output_path=tmp_path / "speech.mp4", steps=2, length=12)
    info = probe_video(result.output)
    assert (info.frames, info.fps, info.width, info.height, info.has_audio) == (12, 30, 64, 64, True)
    assert result.frames == 12 and result.device == "cpu" and result.seconds_per_frame > 0
    assert capsys.readouterr().out.strip().endswith(result.summary)
    landmarker = shared_path("samples", "models", "face_landmarker_v2_with_blendshapes.task")
    driver = tmp_path / "driver.mp4"
    write_video(driver, read_video(reference.with_name("video.mp4")), 30, audio=load_audio(audio))
    reenacted = AniPortrait.from_pretrained(ap.bundle.path, device="cpu", landmarker_model=landmarker).animate_from_video(
        image_path=reference, video_path=driver, output_path=tmp_path / "driven.mp4", length=9, **FAST)
    assert (probe_video(reenacted.output).frames, probe_video(reenacted.output).has_audio) == (9, True)


class HalfSecondOfTone:
    """An audio processor that ignores the file and returns 0.5 s of a 220 Hz tone (and says what it saw)."""

    def __init__(self):
        self.sources: list[str] = []

    def process(self, source, sample_rate=16000) -> ProcessedAudio:
        self.sources.append(str(source))
        tone = 0.3 * np.sin(2 * np.pi * 220 * np.arange(8000) / 16000).astype(np.float32)
        return ProcessedAudio(tone, features={"kind": "tone"})


def test_a_custom_audio_processor_drives_the_frames_and_the_muxed_audio(ap, clip, tmp_path):
    audio, reference = clip
    processor = HalfSecondOfTone()
    ap.audio_processor = processor
    result = ap.animate(image_path=reference, audio_path=audio, output_path=tmp_path / "tone.mp4", **FAST)
    assert processor.sources == [str(audio)]
    assert result.frames == 15 == probe_video(result.output).frames  # ceil(0.5 s x 30 fps)
    muxed = load_audio(result.output)
    assert abs(len(muxed) / 16000 - 0.5) < 0.1 and np.abs(muxed).max() > 0.2


class NoddingMotionModel:
    """A motion model that ignores the speech: the portrait's mesh with the jaw pulled down, nodding, at 25 fps."""

    fps = 25.0

    def predict(self, audio, portrait, *, fps=None, identity=None, pose_overrides=None) -> LandmarkPrediction:
        fps = fps or self.fps
        frames = int(np.ceil(len(audio.samples) / 16000 * fps))
        meshes = np.repeat(portrait.mesh3d[None], frames, axis=0).copy()
        meshes[:, :, 1] -= 0.5 * (meshes[:, :, 1] < np.median(meshes[:, :, 1]))  # the lower face moves down
        poses = np.zeros((frames, 6))
        poses[:, 0] = 10 * np.sin(np.linspace(0, 2 * np.pi, frames))  # pitch in degrees
        return LandmarkPrediction(meshes=meshes.astype(np.float32), poses=poses, fps=fps)


def test_a_custom_motion_model_drives_the_landmarks_and_the_video(ap, clip, tmp_path):
    audio, reference = clip
    ap.motion_model = NoddingMotionModel()
    frames = int(np.ceil(len(load_audio(audio)) / 16000 * 25))
    poses = ap.landmarks(image_path=reference, audio_path=audio, output_path=tmp_path / "nod.mp4", size=64,
                         progress=False)
    arrays = np.load(tmp_path / "nod.npz")
    expected = NoddingMotionModel().predict(ProcessedAudio(load_audio(audio)), ap_portrait(reference))
    assert poses.frames == frames and probe_video(poses.output).fps == 25
    np.testing.assert_allclose(arrays["poses"], expected.poses, atol=1e-5)
    np.testing.assert_allclose(arrays["meshes"], expected.meshes, atol=1e-5)
    video = ap.animate(image_path=reference, audio_path=audio, output_path=tmp_path / "nod_video.mp4", length=10, **FAST)
    assert (video.frames, probe_video(video.output).fps) == (10, 25)


def ap_portrait(reference: Path):
    from aniportrait.inference import load_reference

    return load_reference(reference, size=64)


def test_swap_points_refuse_objects_without_the_interface(ap):
    with pytest.raises(AniPortraitError, match="needs a method process"):
        ap.audio_processor = object()
    with pytest.raises(AniPortraitError, match="needs an fps attribute and a method predict"):
        ap.motion_model = HalfSecondOfTone()


def test_speech_as_an_array_and_unknown_options(ap, clip, tmp_path):
    _, reference = clip
    stereo_44k = np.zeros((22050, 2), np.float32)  # 0.5 s
    ap.audio_processor = type(ap.audio_processor)()
    samples = ap.audio_processor.process(stereo_44k, sample_rate=44100).samples
    result = ap.animate(image_path=reference, audio_path=samples, output_path=tmp_path / "array.mp4", **FAST)
    assert result.frames == 15
    with pytest.raises(AniPortraitError, match=r"unknown option\(s\) stpes; the options are: .*steps"):
        ap.animate(image_path=reference, audio_path=samples, output_path=tmp_path / "x.mp4", stpes=3)


def test_animate_batch_survives_a_failing_job_and_resumes(ap, clip, tmp_path, capsys):
    audio, reference = clip
    jobs = [
        {"image_path": reference, "audio_path": audio, "output_path": tmp_path / "one.mp4", "length": 6},
        {"image_path": tmp_path / "nobody.png", "audio_path": audio, "output_path": tmp_path / "two.mp4"},
        {"image": str(reference), "landmarks": str(reference), "output": str(tmp_path / "three.mp4"), "length": 4},
    ]
    results = ap.animate_batch(jobs, steps=2)
    assert [result.status for result in results] == ["done", "failed", "done"]
    assert "portrait" in results[1].error or "reference not found" in results[1].error
    assert [result.result.frames for result in results if result.result] == [6, 4]
    assert "batch: 3 jobs: 2 done, 0 skipped (finished before), 1 failed" in capsys.readouterr().out
    again = ap.animate_batch(jobs, steps=2, progress=False)
    assert [result.status for result in again] == ["skipped", "failed", "skipped"]
    refused = ap.animate_batch(jobs[:1], skip_existing=False, steps=2, progress=False)  # it exists: not this run's
    assert refused[0].status == "failed" and "exists and this command did not write it; add overwrite=true" in refused[0].error
    redo = ap.animate_batch(jobs[:1], skip_existing=False, overwrite=True, steps=2, progress=False)
    assert redo[0].status == "done"


def test_default_weights_come_from_the_environment(full_bundle, monkeypatch):
    monkeypatch.setenv("ANIPORTRAIT_BUNDLE", str(full_bundle))
    assert AniPortrait(device="cpu").bundle.path == full_bundle


def test_without_weights_offline_one_error_names_both_ways(clip, tmp_path):
    audio, reference = clip
    env = {"ANIPORTRAIT_BUNDLE": "", "ANIPORTRAIT_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "ANIPORTRAIT_LOGS": str(tmp_path / "logs")}
    result = run_cli("infer.py", "mode=audio", f"audio={audio}", f"reference={reference}",
                     f"output={tmp_path / 'out.mp4'}", env=env)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "ANIPORTRAIT_BUNDLE" in errors[0] and "huggingface.co/ZJYang/AniPortrait" in errors[0]
    assert "import-official" in errors[0] and not (tmp_path / "out.mp4").exists()
