"""Streaming stage B (issue 17): generate_video samples on a thread of its own while the caller's thread encodes,
``on_frame(count)`` after each encoded frame; ``window_batch`` (context windows per UNet call) keeps the frames;
the option is checked and reaches AnimationOptions from infer.py's config; the real-time benchmark's CPU smoke run.

Tiny random-init stage B (motion modules randomised so that context windows matter), 64 x 64, 2 steps, on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from operator import attrgetter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, CollectingWriter
from hydra import compose, initialize_config_dir

from aniportrait.cli import options_from_config
from aniportrait.data.synthetic import SyntheticSpec, generate_clip
from aniportrait.data.video import probe_video, read_video
from aniportrait.errors import AniPortraitError
from aniportrait.face.portrait import Portrait
from aniportrait.inference import AnimationOptions, LandmarkPoseFrames, LinearInterpolator, generate_video
from aniportrait.inference import generate as generate_module
from aniportrait.inference.options import Sampling
from aniportrait.models.schedulers import build_scheduler
from aniportrait.models.video_backbone import build_video_models
from aniportrait.pipelines.context import context_schedule
from aniportrait.pipelines.pose2video import Pose2VideoPipeline

pytestmark = pytest.mark.filterwarnings("ignore")

SIZE, FPS = 64, 30


@pytest.fixture(scope="module")
def pipeline() -> Pose2VideoPipeline:
    models = build_video_models({"kind": "tiny", "seed": 0})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # motion modules start as identities: give them weights that mix frames across a window
        for param in models.denoising_unet.motion_module_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    for module in (models.vae, models.image_encoder, models.reference_unet, models.denoising_unet, models.pose_guider):
        module.eval()
    return Pose2VideoPipeline(models.vae, models.image_encoder, models.clip_image_processor, models.reference_unet,
                              models.denoising_unet, models.pose_guider, build_scheduler(None), pose_scaling="unit")


@pytest.fixture(scope="module")
def talking() -> tuple[Portrait, np.ndarray, np.ndarray]:
    """A synthetic portrait, its clip's landmarks (35 frames, moving) and speech."""
    clip = generate_clip(SyntheticSpec(identities=1, clips_per_identity=1, clip_seconds=1.2, size=SIZE), 0, 0)
    arrays = clip.landmarks
    portrait = Portrait(clip.frames[0], arrays["lmks"][0].astype(np.float32), arrays["mesh3d"][0].astype(np.float32),
                        arrays["trans_mat"][0].astype(np.float32), arrays["blendshapes"][0].astype(np.float32),
                        "synthetic#frame=0", (0, 0, SIZE, SIZE))
    return portrait, arrays["lmks"][:, :468, :2], clip.audio.astype(np.float32)


def _generate(pipeline, talking, output: Path, frames: int, on_frame=None, **options) -> int:
    portrait, landmarks, audio = talking
    assert len(landmarks) >= frames
    options = AnimationOptions(**{"width": SIZE, "height": SIZE, "steps": 2, "guidance": 3.5, "seed": 3,
                                  "progress": False, **options})
    return generate_video(pipeline, portrait, LandmarkPoseFrames(landmarks[:frames], (SIZE, SIZE)), output, FPS,
                          audio[: int(frames / FPS * 16_000)], options, on_frame=on_frame)


@contextmanager
def _unet_calls(pipeline, module: str = "denoising_unet"):
    """Counts the forward calls of the pipeline's ``module`` (decode calls: ``vae.decoder``)."""
    calls = []
    handle = attrgetter(module)(pipeline).register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


# -- on_frame -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames,options", [
    (20, {"sampling": "official"}),  # the whole video as one sequence of windows (and the preset swap's recursion)
    (26, {"sampling": "project", "chunk_frames": 12, "chunk_overlap": 4}),  # chunks that cross-fade
    (17, {"sampling": "project", "keyframe_interval": 3, "interpolator": LinearInterpolator()}),  # interpolated
], ids=["whole", "chunks", "keyframes"])
def test_on_frame_counts_every_encoded_frame_in_order_on_the_callers_thread(pipeline, talking, tmp_path, frames,
                                                                           options):
    counts, threads = [], set()

    def on_frame(count: int) -> None:
        counts.append(count)
        threads.add(threading.get_ident())

    output = tmp_path / "streamed.mp4"
    written = _generate(pipeline, talking, output, frames, on_frame, context_frames=8, context_overlap=2, **options)
    assert written == frames
    assert counts == list(range(1, frames + 1))
    assert probe_video(output).frames == len(read_video(output)) == frames
    assert threads == {threading.get_ident()}  # the encoder's (caller's) thread, not the sampling thread
    # the sampling thread is kept for the caller's next video (cuDNN plans are per thread), not one per video
    assert len([thread for thread in threading.enumerate() if thread.name == "stage-b-frames"]) <= 1


def test_a_failing_on_frame_stops_sampling_and_leaves_no_file(pipeline, talking, tmp_path):
    def on_frame(count: int) -> None:
        if count == 3:
            raise KeyboardInterrupt  # a viewer that hangs up

    with pytest.raises(KeyboardInterrupt):
        _generate(pipeline, talking, tmp_path / "stopped.mp4", 30, on_frame, sampling="project", chunk_frames=10,
                  chunk_overlap=2, context_frames=8, context_overlap=2)
    assert list(tmp_path.iterdir()) == []  # no partial mp4, no temporary file
    # the sampling thread is kept for the caller's next video (cuDNN plans are per thread), not one per video
    assert len([thread for thread in threading.enumerate() if thread.name == "stage-b-frames"]) <= 1  # joined


# -- window_batch ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["project", "official"])
def test_batched_windows_write_the_same_frames(pipeline, talking, tmp_path, sampling):
    """30 frames in windows of 8 sharing 2: 5 windows (blended: starts 0, 6, 12, 18, 22; official: 0, 6, ... 24,
    wrapping round), so window_batch=2 makes groups of 2, 2 and 1. With classifier-free guidance on the UNet
    batches are [uncond x k; cond x k]. Batched matrix products round differently now and then (not on every run:
    the CPU's kernels pick their blocking at run time), a level of a few pixels, which H.264 can spread over a
    block; so the mp4s agree to a small fraction of the difference another window layout makes."""
    frames, layout = 30, {"context_frames": 8, "context_overlap": 2, "sampling": sampling, "chunk_frames": None}
    preset_schedule = "blended" if sampling == "project" else "uniform"
    windows = context_schedule(preset_schedule, frames, 8, 2, guided=True).windows
    assert len(windows) == 5
    videos, unet_calls = {}, {}
    for window_batch in (1, 2):
        output = tmp_path / f"batch{window_batch}.mp4"
        with _unet_calls(pipeline) as calls:
            assert _generate(pipeline, talking, output, frames, window_batch=window_batch, **layout) == frames
        videos[window_batch], unet_calls[window_batch] = read_video(output), len(calls)
    assert unet_calls == {1: 5 * 2, 2: 3 * 2}  # the option reached the pipeline: 3 groups of windows per step
    assert videos[1].shape == (frames, SIZE, SIZE, 3)
    batched = np.abs(videos[2].astype(int) - videos[1].astype(int))
    # the comparison can tell: another window layout of the same video gives other frames
    other = tmp_path / "other_layout.mp4"
    _generate(pipeline, talking, other, frames, **{**layout, "context_frames": 12})
    layout_change = np.abs(read_video(other).astype(int) - videos[1].astype(int)).mean()
    assert layout_change > 1
    assert batched.mean() < 0.1 * layout_change and (batched > 0).mean() < 0.1, (batched.mean(), layout_change)


def test_a_short_first_chunk_reaches_the_pipeline(pipeline, talking, tmp_path, monkeypatch):
    """stream.first_chunk_frames: 26 frames in chunks of 12 sharing 4, the first of 6: pipeline calls of 6, 12, 12
    pose frames (starts 0, 2, 10, then 18 covers the rest), every frame written once."""
    lengths = []
    denoise = pipeline.denoise

    def recording(reference_image, pose_images, *args, **kwargs):
        lengths.append(len(pose_images))
        return denoise(reference_image, pose_images, *args, **kwargs)

    monkeypatch.setattr(pipeline, "denoise", recording)
    written = _generate(pipeline, talking, tmp_path / "short_first.mp4", 26, sampling="project", chunk_frames=12,
                        chunk_overlap=4, first_chunk_frames=6, context_frames=8, context_overlap=2)
    assert written == 26 and lengths == [6, 12, 12, 8]
    with pytest.raises(AniPortraitError, match="first_chunk_frames"):
        AnimationOptions(chunk_frames=12, chunk_overlap=4, first_chunk_frames=4)


def test_decode_batch_reaches_the_decoder_and_keeps_the_frames(pipeline, talking, tmp_path):
    """decode_batch (infer.py's key): 13 frames decoded 1 or 5 per VAE call make 13 or 3 decoder calls; the decoded
    frames agree up to the float rounding of batched convolutions (compared before H.264, which amplifies a level)."""
    decoder_calls = {}
    for decode_batch in (1, 5):
        with _unet_calls(pipeline, "vae.decoder") as calls:
            _generate(pipeline, talking, tmp_path / f"decode{decode_batch}.mp4", 13, decode_batch=decode_batch,
                      sampling="official")
        decoder_calls[decode_batch] = len(calls)
    assert decoder_calls == {1: 13, 5: 3}
    latents = torch.randn(1, 4, 13, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    one, five = (list(pipeline.decode(latents, batch_size, output_type="float")) for batch_size in (1, 5))
    assert [len(chunk) for chunk in five] == [5, 5, 3]
    np.testing.assert_allclose(np.concatenate(five), np.concatenate(one), atol=1e-5)
    assert np.abs(np.concatenate(one)[1:] - np.concatenate(one)[:-1]).max() > 0.01  # frames that differ
    with pytest.raises(AniPortraitError, match="decode_batch"):
        AnimationOptions(decode_batch=0)


def test_batched_windows_without_guidance_differ_only_by_float_rounding(pipeline, talking):
    """guidance=1 (the distilled student): batches of k windows instead of 1 round differently in the CPU's matrix
    products (a few 1e-6), at most one level of the uint8 frames. (Through H.264 a one-level input difference can
    move decoded pixels by much more, so this compares the pipeline's frames before encoding.)"""
    from aniportrait.inference import draw_pose_images

    portrait, landmarks, _ = talking
    poses = draw_pose_images(landmarks[:30], (SIZE, SIZE))

    def frames(window_batch: int, output_type: str) -> np.ndarray:
        return pipeline(portrait.image, poses, None, num_inference_steps=2, guidance_scale=1.0, context_frames=8,
                        context_overlap=2, generator=torch.Generator().manual_seed(3), progress=False,
                        window_batch=window_batch, output_type=output_type)

    plain, batched = frames(1, "float"), frames(2, "float")
    assert np.abs(batched - plain).max() <= 2e-5
    plain, batched = frames(1, "uint8"), frames(2, "uint8")
    assert np.abs(batched.astype(int) - plain.astype(int)).max() <= 1


def test_window_batch_is_checked_and_comes_from_infer_config():
    for bad in (0, -2, "two"):
        with pytest.raises(AniPortraitError, match="window_batch"):
            AnimationOptions(window_batch=bad)
    assert AnimationOptions(window_batch="4").window_batch == 4
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        default = compose(config_name="infer")
        batched = compose(config_name="infer", overrides=["window_batch=3"])
    assert AnimationOptions.from_kwargs(**options_from_config(default)).window_batch == 1
    assert AnimationOptions.from_kwargs(**options_from_config(batched)).window_batch == 3
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):  # the other sampling-cost keys
        tuned = compose(config_name="infer", overrides=["decode_batch=8", "deep_cache_interval=3"])
    defaults = AnimationOptions.from_kwargs(**options_from_config(default))
    assert (defaults.decode_batch, defaults.deep_cache_interval) == (None, None)  # the preset's, below
    tuned = AnimationOptions.from_kwargs(**options_from_config(tuned))
    assert (tuned.decode_batch, tuned.deep_cache_interval) == (8, 3)
    with pytest.raises(AniPortraitError, match="deep_cache_interval"):
        AnimationOptions(deep_cache_interval=0)


def test_deep_cache_interval_comes_from_the_preset_unless_set():
    """Deep-feature reuse by default for models trained here (project: every 2nd step), never for the official
    preset (its frames are the official pipeline's) nor for a distilled student; an explicit value or the bundle's
    setting wins."""
    assert Sampling.resolve(AnimationOptions(), {}).deep_cache_interval == 2
    assert Sampling.resolve(AnimationOptions(), {"sampling": "official"}).deep_cache_interval == 1
    assert Sampling.resolve(AnimationOptions(deep_cache_interval=1), {}).deep_cache_interval == 1
    assert Sampling.resolve(AnimationOptions(deep_cache_interval=3), {"sampling": "official"}).deep_cache_interval == 3
    assert Sampling.resolve(AnimationOptions(), {"deep_cache_interval": 1}).deep_cache_interval == 1


def test_the_context_window_comes_from_the_bundle_and_fits_the_preset():
    """Bundles trained here record auto (the fewest windows, blended schedule); the official release records 16;
    a bundle naming none gets 16. Under the official preset (fixed windows) a bundle's auto is the official 16, while
    an explicit auto there stays the error the uniform schedule gives (tests/test_sampling_presets.py)."""
    from hydra import compose, initialize_config_dir

    config_dir = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        for model in ("video_stage1", "video_stage2"):
            cfg = compose(config_name="train", overrides=[f"model={model}", "backbone=tiny"])
            assert cfg.model.sampling.context_frames == "auto"
    trained = {"context_frames": "auto"}
    assert Sampling.resolve(AnimationOptions(), trained).context_frames == "auto"
    assert Sampling.resolve(AnimationOptions(), {**trained, "sampling": "official"}).context_frames == 16
    assert Sampling.resolve(AnimationOptions(sampling="official"), trained).context_frames == 16
    assert Sampling.resolve(AnimationOptions(context_frames=12), trained).context_frames == 12
    assert Sampling.resolve(AnimationOptions(context_frames="auto"), {"context_frames": 16}).context_frames == "auto"
    assert Sampling.resolve(AnimationOptions(), {}).context_frames == 16
    assert Sampling.resolve(AnimationOptions(), {"context_frames": 16, "sampling": "official"}).context_frames == 16


def test_generate_video_samples_with_the_resolved_deep_cache_interval(monkeypatch, tmp_path):
    """What generate_video hands the pipeline: the project preset's interval 2 unless told otherwise."""
    seen = []

    class Recorder:
        preset, video_settings = SimpleNamespace(name="project"), {}

        def frames(self, *args, deep_cache_interval, **kwargs):
            seen.append(deep_cache_interval)
            yield np.zeros((len(args[1]), 8, 8, 3), np.uint8)

    monkeypatch.setattr(generate_module, "EncoderProcess", CollectingWriter)
    portrait = Portrait(np.zeros((8, 8, 3), np.uint8), np.full((478, 3), 0.5, np.float32), np.zeros((468, 3), np.float32),
                        np.eye(4, dtype=np.float32), np.zeros(52, np.float32))
    poses = LandmarkPoseFrames(np.full((6, 468, 2), 0.5, np.float32), (8, 8))
    for options, expected in ((AnimationOptions(width=8, height=8, chunk_frames=6, chunk_overlap=2, progress=False), 2),
                              (AnimationOptions(width=8, height=8, chunk_frames=6, chunk_overlap=2, deep_cache_interval=1,
                                                progress=False), 1)):
        generate_video(Recorder(), portrait, poses, tmp_path / "out.mp4", 30.0, None, options)
        assert seen[-1] == expected


def test_encoder_threads_reach_the_encoder(monkeypatch, tmp_path):
    """generate_video's x264 threads: encoder_threads, or one per usable core up to MAX_AUTO_THREADS."""
    from aniportrait.data import video_encoder

    class Frames:
        preset, video_settings = SimpleNamespace(name="project"), {}

        def frames(self, *args, **kwargs):
            yield np.zeros((len(args[1]), 8, 8, 3), np.uint8)

    monkeypatch.setattr(generate_module, "EncoderProcess", CollectingWriter)
    portrait = Portrait(np.zeros((8, 8, 3), np.uint8), np.full((478, 3), 0.5, np.float32), np.zeros((468, 3), np.float32),
                        np.eye(4, dtype=np.float32), np.zeros(52, np.float32))
    poses = LandmarkPoseFrames(np.full((4, 468, 2), 0.5, np.float32), (8, 8))
    for cores, threads, expected in ((2, None, 2), (64, None, video_encoder.MAX_AUTO_THREADS), (64, 3, 3)):
        monkeypatch.setattr(video_encoder.os, "sched_getaffinity", lambda _, cores=cores: set(range(cores)), raising=False)
        options = AnimationOptions(width=8, height=8, chunk_frames=4, chunk_overlap=1, encoder_threads=threads,
                                   progress=False)
        assert generate_video(Frames(), portrait, poses, tmp_path / "out.mp4", 30.0, None, options) == 4
        assert CollectingWriter.threads == expected
    with pytest.raises(AniPortraitError, match="encoder_threads=0"):
        AnimationOptions(encoder_threads=0)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        assert compose(config_name="infer").encoder_threads is None
        set_threads = compose(config_name="infer", overrides=["encoder_threads=4"])
    assert AnimationOptions.from_kwargs(**options_from_config(set_threads)).encoder_threads == 4


# -- benchmarks/realtime.py --tiny ----------------------------------------------------------------------------


def test_realtime_benchmark_smoke_run(tmp_path):
    out = tmp_path / "realtime.json"
    result = subprocess.run([sys.executable, "benchmarks/realtime.py", "--tiny", "--breakdown", "1", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    breakdown = report["breakdown"]  # where 1 s of video spent its time: the parts ran, and were counted
    assert breakdown["video"]["frames"] == 30 and breakdown["calls"]["encoder_write"] == 30
    assert breakdown["calls"]["denoise"] >= 1 and breakdown["calls"]["decode"] >= 1
    assert 0 < breakdown["wall_seconds"]["denoise"] < breakdown["video"]["seconds"]
    assert breakdown["calls"]["reference_pass"] == 1  # later chunks of the video reuse the reference pass
    assert report["frames_per_s"] > 0 and report["first_frame_latency_s"] > 0
    streamed = report["streamed"]
    assert streamed["frames"] == 90  # 3 s at 30 fps
    assert streamed["frames_per_s"] == report["frames_per_s"]
    assert 0 < streamed["first_frame_latency_s"] < streamed["seconds"]
    assert report["settings"]["steps"] == 4 and report["settings"]["guidance"] == 1.0
    assert f"results: {out}" in result.stdout
    assert report["complete"] and streamed["bytes"] > 0


def test_realtime_benchmark_deadline_keeps_a_partial_measurement(tmp_path):
    """--deadline: a video still running past it is stopped and the frames written by then are reported."""
    out = tmp_path / "realtime.json"
    result = subprocess.run([sys.executable, "benchmarks/realtime.py", "--tiny", "--deadline", "0.01", "--out",
                             str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] is False and 1 <= report["streamed"]["frames"] < 90
    assert report["streamed"]["bytes"] is None and report["frames_per_s"] > 0
