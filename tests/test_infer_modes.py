"""infer.py's modes end to end on the quickstart bundle (both stages, tiny, trained here): frame counts, fps, the
muxed audio, the size; accelerated mode; streaming in chunks; batch runs that resume and survive a failing job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli, shared_path
from hydra import compose, initialize_config_dir

from aniportrait.api import AniPortrait
from aniportrait.audio.io import frame_count, load_audio
from aniportrait.data.clip import Manifest
from aniportrait.data.video import probe_video, read_video, write_video
from aniportrait.errors import AniPortraitError
from aniportrait.inference import (
    FlowInterpolator,
    LinearInterpolator,
    build_interpolator,
    chunk_spans,
    keyframe_indices,
    read_manifest,
    stitch_chunks,
)

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def clips(tiny_dataset) -> list[tuple[Path, Path]]:
    """(audio.wav, landmarks.npz) of the test clips."""
    return [(tiny_dataset / record.audio, tiny_dataset / record.landmarks)
            for record in Manifest.load(tiny_dataset).split("test")]


@pytest.fixture(scope="module")
def ap(full_bundle) -> AniPortrait:
    return AniPortrait.from_pretrained(full_bundle, device="cpu")


def _infer(tmp_path: Path, *args: str):
    return run_cli("infer.py", *args, "steps=2", env={"ANIPORTRAIT_LOGS": str(tmp_path / "logs")})


def _audio_seconds(path: Path) -> float:
    return len(load_audio(path)) / 16000


def test_audio_mode_streams_chunks_into_one_video_with_the_speech(full_bundle, clips, tmp_path):
    audio, reference = clips[0]
    output = tmp_path / "missing" / "folder" / "talking.mp4"
    result = _infer(tmp_path, "mode=audio", f"bundle={full_bundle}", f"audio={audio}", f"reference={reference}",
                    f"output={output}", "stream.chunk_frames=20", "stream.chunk_overlap=4")
    assert result.returncode == 0, result.stderr[-3000:]
    frames = frame_count(len(load_audio(audio)), 30)
    info = probe_video(output)
    assert (info.frames, info.fps, info.width, info.height, info.has_audio) == (frames, 30, 64, 64, True)
    assert abs(_audio_seconds(output) - frames / 30) < 0.1
    assert f"{output}: {frames} frames" in result.stdout and "s/frame, cpu" in result.stdout
    assert [path.name for path in output.parent.iterdir()] == ["talking.mp4"]  # no temporary files left


def test_video_mode_reenacts_a_driving_video_with_its_audio(full_bundle, clips, tiny_dataset, tmp_path):
    landmarker = shared_path("samples", "models", "face_landmarker_v2_with_blendshapes.task")
    driver_audio, driver_landmarks = clips[1]
    driver = tmp_path / "driver.mp4"  # a talking synthetic face with its speech
    write_video(driver, read_video(driver_landmarks.with_name("video.mp4")), 30, audio=load_audio(driver_audio))
    output = tmp_path / "reenacted.mp4"
    result = _infer(tmp_path, "mode=video", f"bundle={full_bundle}", f"video={driver}", f"reference={clips[0][1]}",
                    f"output={output}", "fps=25", "width=96", "height=64", f"face.landmarker_model={landmarker}")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = int(np.ceil(probe_video(driver).frames * 25 / 30))  # resampled to 25 fps
    info = probe_video(output)
    assert (info.frames, info.fps, info.width, info.height, info.has_audio) == (expected, 25, 96, 64, True)
    assert abs(_audio_seconds(output) - expected / 25) < 0.1


def test_pose_mode_from_landmarks_npz_and_from_a_pose_video(ap, clips, tmp_path):
    audio, reference = clips[0]
    poses = ap.landmarks(image_path=reference, audio_path=audio, output_path=tmp_path / "poses.mp4", size=64,
                         progress=False)
    from_npz = ap.animate_from_landmarks(image_path=reference, landmarks_path=tmp_path / "poses.npz",
                                         output_path=tmp_path / "from_npz.mp4", audio_path=audio, steps=2, length=20)
    from_video = ap.animate_from_landmarks(image_path=reference, landmarks_path=tmp_path / "poses.mp4",
                                           output_path=tmp_path / "from_video.mp4", steps=2)
    clip_format = ap.animate_from_landmarks(image_path=reference, landmarks_path=reference,
                                            output_path=tmp_path / "from_clip.mp4", steps=2, length=10)
    assert (from_npz.frames, from_video.frames, clip_format.frames) == (20, poses.frames, 10)
    for result, has_audio in ((from_npz, True), (from_video, True), (clip_format, False)):
        info = probe_video(result.output)
        assert (info.frames, info.fps, info.width, info.height, info.has_audio) == (result.frames, 30, 64, 64, has_audio)


class CountingInterpolator(LinearInterpolator):
    """Records how many frames it was asked for."""

    def __init__(self):
        self.requested = 0

    def __call__(self, first, last, fractions):
        self.requested += len(fractions)
        return super().__call__(first, last, fractions)


def test_accelerated_mode_generates_keyframes_and_interpolates_the_rest(ap, clips, tmp_path):
    audio, reference = clips[0]
    frames = frame_count(len(load_audio(audio)), 30)
    interpolator = CountingInterpolator()
    result = ap.animate(image_path=reference, audio_path=audio, output_path=tmp_path / "fast.mp4", steps=2,
                        keyframe_interval=4, interpolator=interpolator, chunk_frames=6, chunk_overlap=2)
    keys = keyframe_indices(frames, 4)
    assert result.frames == frames == probe_video(result.output).frames
    assert interpolator.requested == frames - len(keys)
    configured = ap.animate(image_path=reference, audio_path=audio, output_path=tmp_path / "flow.mp4", steps=2,
                            length=9, keyframe_interval=3,
                            interpolator={"_target_": "aniportrait.inference.FlowInterpolator", "window": 9})
    assert configured.frames == probe_video(configured.output).frames == 9


def test_keyframes_chunks_and_cross_fades():
    assert keyframe_indices(10, 3).tolist() == [0, 3, 6, 9]
    assert keyframe_indices(11, 3).tolist() == [0, 3, 6, 9, 10]
    assert keyframe_indices(1, 4).tolist() == [0]
    spans = chunk_spans(100, 48, 8)
    assert [(span.start, span.stop) for span in spans] == [(0, 48), (40, 88), (80, 100)]
    assert chunk_spans(30, 48, 8) == [slice(0, 30)]
    short_first = chunk_spans(100, 48, 8, first_frames=16)  # a streaming viewer's first chunk: 16 frames
    assert [(span.start, span.stop) for span in short_first] == [(0, 16), (8, 56), (48, 96), (88, 100)]
    assert chunk_spans(12, 48, 8, first_frames=16) == [slice(0, 12)]
    with pytest.raises(AniPortraitError, match="first_chunk_frames=8"):
        chunk_spans(100, 48, 8, first_frames=8)
    # two chunks of constant frames sharing 3: each frame once, the shared ones fading from the first to the second
    first, second = np.zeros((6, 2, 2, 3), np.uint8), np.full((5, 2, 2, 3), 200, np.uint8)
    frames = np.stack(list(stitch_chunks([first, second], 3)))
    assert len(frames) == 6 + 5 - 3
    assert frames[:, 0, 0, 0].tolist() == [0, 0, 0, 50, 100, 150, 200, 200]
    # chunks as batches of decoded frames (what generate_video streams): the same frames, each yielded as soon as it
    # cannot be in the next chunk's overlap
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 255, (n, 2, 2, 3), dtype=np.uint8) for n in (7, 9, 5)]
    whole = np.stack(list(stitch_chunks(chunks, 3)))
    log = []

    def batches(index, chunk):
        for start in range(0, len(chunk), 2):
            log.append((index, start))
            yield chunk[start : start + 2]

    streamed = []
    for frame in stitch_chunks((batches(index, chunk) for index, chunk in enumerate(chunks)), 3):
        streamed.append(frame)
        if len(streamed) == 1:
            assert log == [(0, 0), (0, 2)]  # the first frame left after 2 of chunk 0's 4 batches (frames 0-3)
    np.testing.assert_array_equal(np.stack(streamed), whole)
    assert len(whole) == 7 + 9 + 5 - 2 * 3


def _square(x: int) -> np.ndarray:
    image = np.zeros((64, 64, 3), np.uint8)
    image[24:40, x : x + 16] = 255
    return image


def test_flow_interpolation_moves_content_where_a_cross_fade_ghosts():
    first, last = _square(10), _square(26)
    flow_mid = FlowInterpolator()(first, last, [0.5])[0]
    fade_mid = LinearInterpolator()(first, last, [0.5])[0]
    columns = np.flatnonzero(flow_mid[32, :, 0] > 127)
    assert abs(columns.mean() - (18 + 7.5)) < 2  # the square half way, whole
    assert fade_mid[32, 15, 0] in (127, 128) and fade_mid[32, 35, 0] in (127, 128)  # two half-bright copies


@pytest.mark.parametrize("option,cls", [("flow", FlowInterpolator), ("linear", LinearInterpolator)])
def test_interpolator_config_group(option, cls):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="infer", overrides=[f"interpolator={option}"])
    assert isinstance(build_interpolator(cfg.interpolator), cls)


def test_batch_resumes_and_reports_a_failing_job_without_stopping(full_bundle, clips, tmp_path):
    (audio, reference), (other_audio, _) = clips[0], clips[1]
    manifest = tmp_path / "jobs.csv"
    manifest.write_text("image,audio,landmarks,output,length,keyframe_interval\n"
                        f"{reference},{audio},,out/speech.mp4,12,\n"
                        f"{reference},{tmp_path / 'missing.wav'},,out/broken.mp4,,\n"
                        f"{reference},,{reference},out/posed.mp4,8,2\n"
                        f"{reference},{other_audio},,out/second.mp4,5,\n")
    assert [job["mode"] for job in read_manifest(manifest)] == ["audio", "audio", "pose", "audio"]
    first = _infer(tmp_path, "mode=batch", f"bundle={full_bundle}", f"manifest={manifest}")
    assert first.returncode == 2
    assert "batch: 4 jobs: 3 done, 0 skipped (finished before), 1 failed" in first.stdout
    assert "missing.wav" in first.stdout and "error: 1 of 4 batch jobs failed" in first.stderr
    outputs = {name: tmp_path / "out" / f"{name}.mp4" for name in ("speech", "posed", "second")}
    assert {name: probe_video(path).frames for name, path in outputs.items()} == {"speech": 12, "posed": 8, "second": 5}
    assert not (tmp_path / "out" / "broken.mp4").exists()
    stamps = {name: path.stat().st_mtime_ns for name, path in outputs.items()}
    second = _infer(tmp_path, "mode=batch", f"bundle={full_bundle}", f"manifest={manifest}")
    assert "batch: 4 jobs: 0 done, 3 skipped (finished before), 1 failed" in second.stdout
    assert {name: path.stat().st_mtime_ns for name, path in outputs.items()} == stamps  # untouched


def test_jsonl_manifest_and_bad_rows(tmp_path):
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text('{"image": "a.png", "video": "drive.mp4", "output": "o.mp4", "seed": 3}\n\n'
                        '{"image_path": "/abs/a.png", "landmarks_path": "p.npz", "output_path": "p.mp4"}\n')
    jobs = read_manifest(manifest)
    assert jobs[0] == {"image_path": tmp_path / "a.png", "video_path": tmp_path / "drive.mp4",
                       "output_path": tmp_path / "o.mp4", "seed": 3, "mode": "video"}
    assert jobs[1]["image_path"] == Path("/abs/a.png") and jobs[1]["mode"] == "pose"
    manifest.write_text('{"image": "a.png", "audio": "s.wav", "output": "o.mp4", "stepz": 3}\n')
    with pytest.raises(Exception, match=r"jobs.jsonl line 1: unknown job field 'stepz'"):
        read_manifest(manifest)
    manifest.write_text('{"image": "a.png", "audio": "s.wav", "video": "v.mp4", "output": "o.mp4"}\n')
    with pytest.raises(Exception, match="exactly one of audio, video, landmarks"):
        read_manifest(manifest)


def test_another_sampler_and_auto_windows_keep_the_bundle_schedule(ap, clips, tmp_path):
    """scheduler= swaps the sampler for one video, built on the bundle's scheduler config (v-prediction, zero
    terminal SNR, trailing spacing carry over); the bundle's own sampler is back afterwards."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from aniportrait.errors import AniPortraitError
    from aniportrait.inference import build_sampling_scheduler

    base = ap.pipeline.scheduler
    built = build_sampling_scheduler("DPMSolverMultistepScheduler", base)
    assert isinstance(built, DPMSolverMultistepScheduler) and built.config.final_sigmas_type == "zero"
    for key in ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing", "beta_schedule"):
        assert built.config[key] == base.config[key]
    with pytest.raises(AniPortraitError, match="not a diffusers scheduler"):
        build_sampling_scheduler({"_target_": "diffusers.NoSuchScheduler"}, base)

    _, reference = clips[0]
    common = {"image_path": reference, "landmarks_path": reference, "length": 12, "progress": False}
    ddim = ap.animate_from_landmarks(output_path=tmp_path / "ddim.mp4", steps=3, **common)
    dpm = ap.animate_from_landmarks(output_path=tmp_path / "dpm.mp4", steps=3, context_frames="auto",
                                    scheduler={"_target_": "DPMSolverMultistepScheduler", "solver_order": 2}, **common)
    assert ddim.frames == dpm.frames == probe_video(dpm.output).frames == 12
    assert isinstance(ap.pipeline.scheduler, DDIMScheduler) and ap.pipeline.scheduler is base
    assert np.abs(read_video(ddim.output).astype(int) - read_video(dpm.output).astype(int)).mean() > 0.5


def test_bad_sampler_settings_are_one_clear_error(full_bundle, clips, tmp_path):
    _, reference = clips[0]
    result = _infer(tmp_path, "mode=pose", f"bundle={full_bundle}", f"reference={reference}",
                    f"landmarks={reference}", f"output={tmp_path / 'x.mp4'}", "scheduler=Nope", "length=4")
    assert result.returncode == 2 and "scheduler: 'Nope' is not a diffusers scheduler" in result.stderr
    assert not (tmp_path / "x.mp4").exists()
