"""Inference speed switches compute the same video as the plain path (issue 8): windows batched into one UNet
call, channels-last weights, torch.compile (aot_eager on CPU), and the "auto" window layout's coverage."""

import numpy as np
import pytest
import torch
from test_pose2video import pipeline_of, randomize_motion_modules

from aniportrait.errors import AniPortraitError
from aniportrait.models.video_backbone import build_video_models
from aniportrait.pipelines.pose2video import context_windows

pytestmark = pytest.mark.filterwarnings("ignore")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _inputs(frames=20, size=64):
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    poses = np.zeros((frames, size, size, 3), np.uint8)
    for t in range(frames):  # a moving bar: frames differ, so windows matter
        poses[t, 20:28, 4 + 2 * t : 12 + 2 * t] = (10, 200, 10)
    return reference, poses


def _run(pipeline, **options):
    reference, poses = _inputs()
    return pipeline(reference, poses, num_inference_steps=3, guidance_scale=3.5, context_frames=8, context_overlap=2,
                    generator=torch.Generator().manual_seed(0), progress=False, **options)


@pytest.fixture(scope="module")
def models():
    models = build_video_models({"kind": "tiny", "seed": 0})
    randomize_motion_modules(models)
    return models


def test_batched_windows_equal_one_window_per_call(models):
    pipeline = pipeline_of(models)
    plain = _run(pipeline, window_batch=1)
    batched = _run(pipeline, window_batch=8)
    assert _psnr(batched, plain) > 45, _psnr(batched, plain)


@pytest.mark.parametrize("optimize", [
    {"channels_last": True},
    pytest.param({"channels_last": True, "compile": {"backend": "aot_eager"}},
                 marks=pytest.mark.slow, id="compile"),  # minutes of tracing on 2 cores: pytest -m slow
])
def test_channels_last_and_compile_keep_the_video(models, optimize):
    plain = _run(pipeline_of(models))
    fast_models = build_video_models({"kind": "tiny", "seed": 0})
    randomize_motion_modules(fast_models)
    fast = pipeline_of(fast_models).optimize(**optimize)
    video = _run(fast, window_batch=8)
    assert _psnr(video, plain) >= 35, _psnr(video, plain)


@pytest.mark.parametrize("frames,windows,length", [(48, 2, 26), (64, 3, 24), (32, 1, 32), (10, 1, 10), (100, 4, 28),
                                                    (4, 1, 4), (1, 1, 1)])  # shorter than the overlap: one window
def test_auto_windows_are_few_and_short(frames, windows, length):
    layout = context_windows(frames, "auto", 4)
    assert len(layout) == windows and {w.stop - w.start for w in layout} == {length}
    covered = np.zeros(frames, int)
    for window in layout:
        covered[window] += 1
    assert covered.min() >= 1 and layout[-1].stop == frames
    overlaps = [a.stop - b.start for a, b in zip(layout, layout[1:])]
    assert all(overlap >= 4 for overlap in overlaps)


@pytest.mark.gpu
def test_gpu_decode_copies_behind_the_next_call_and_keeps_the_frames():
    """On a GPU, decode() queues call k + 1 before it waits for call k's (pinned, asynchronous) copy: the frames
    are those of one synchronous decode of all frames, in order, none lost or overwritten."""
    models = build_video_models({"kind": "tiny", "seed": 0})
    vae = models.vae.eval()
    latents = torch.randn(1, 4, 11, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vae.decode(latents[0].transpose(0, 1) / vae.config.scaling_factor).sample
    expected = (expected / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    pipeline = pipeline_of(models)
    pipeline.vae = vae.to("cuda")
    chunks = list(pipeline.decode(latents.to("cuda"), 3, output_type="float"))
    assert [len(chunk) for chunk in chunks] == [3, 3, 3, 2]
    np.testing.assert_allclose(np.concatenate(chunks), expected, atol=1e-3)


def test_deep_cache_runs_the_whole_unet_every_nth_step(models):
    """deep_cache_interval=2 over 3 steps: the deeper layers run at steps 0 and 2 only (per window), the top level at
    every step; the frames differ from the whole UNet's (another function, to be judged on trained weights) but stay
    a video of the same size; a bad interval is one clear error."""
    pipeline = pipeline_of(models)
    deep_calls, top_calls = [], []
    deep_hook = models.denoising_unet.mid_block.resnets[0].register_forward_hook(lambda *_: deep_calls.append(1))
    top_hook = models.denoising_unet.up_blocks[-1].resnets[0].register_forward_hook(lambda *_: top_calls.append(1))
    try:
        whole = _run(pipeline)
        counts_whole = len(deep_calls), len(top_calls)
        deep_calls.clear(), top_calls.clear()
        cached = _run(pipeline, deep_cache_interval=2)
        counts_cached = len(deep_calls), len(top_calls)
    finally:
        deep_hook.remove(), top_hook.remove()
    windows = counts_whole[0] // 3
    assert counts_whole == (3 * windows, 3 * windows) and counts_cached == (2 * windows, 3 * windows)
    assert cached.shape == whole.shape and 15 < _psnr(cached, whole) < 80
    with pytest.raises(AniPortraitError, match="deep_cache_interval"):
        _run(pipeline, deep_cache_interval=0)


def test_the_next_call_with_the_same_reference_reuses_its_pass(models):
    """A second call with the same reference, size, guidance and weights (a stream's next chunk) skips the reference
    pass (CLIP, VAE encoding, ReferenceNet) and gives the frames a fresh pipeline gives; another reference, another
    guidance or changed weights run it again."""
    calls = []
    hooks = [models.reference_unet.register_forward_hook(lambda *_: calls.append("reference_unet")),
             models.image_encoder.register_forward_hook(lambda *_: calls.append("image_encoder"))]
    try:
        pipeline = pipeline_of(models)
        first = _run(pipeline)
        assert calls == ["image_encoder", "reference_unet"]
        again = _run(pipeline)
        assert calls == ["image_encoder", "reference_unet"]  # reused
        np.testing.assert_array_equal(again, first)
        pipeline = pipeline_of(models)  # a fresh pipeline (it reinstalls the processors: the old one is done)
        np.testing.assert_array_equal(_run(pipeline), first)  # the same frames
        calls.clear()
        reference, poses = _inputs()
        pipeline(reference[::-1].copy(), poses, num_inference_steps=1, guidance_scale=3.5, context_frames=8,
                 progress=False)
        pipeline(reference[::-1].copy(), poses, num_inference_steps=1, guidance_scale=1.0, context_frames=8,
                 progress=False)
        assert calls.count("reference_unet") == 2  # another image, then another guidance
        calls.clear()
        _run(pipeline)
        with torch.no_grad():
            models.reference_unet.conv_in.bias.add_(0.5)  # weights changed in place (as load_state_dict does)
        changed = _run(pipeline)
        assert calls.count("reference_unet") == 2
        assert not np.array_equal(changed, first)
        pipeline.forget_reference()  # what the benchmarks do before each timed video
        _run(pipeline)
        assert calls.count("reference_unet") == 3
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            models.reference_unet.conv_in.bias.sub_(0.5)
