"""Pose-to-video sampling on the tiny backbone: output, seeds, context windows, guidance, schedulers, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aniportrait.errors import AniPortraitError
from aniportrait.models.video_backbone import VideoModels, build_video_models
from aniportrait.pipelines.context import context_schedule
from aniportrait.pipelines.pose2video import (
    Pose2VideoPipeline,
    build_scheduler,
    context_windows,
    window_weights,
)

SIZE = 64


def pipeline_of(models: VideoModels, scheduler: dict | None = None) -> Pose2VideoPipeline:
    for module in (models.vae, models.image_encoder, models.reference_unet, models.denoising_unet, models.pose_guider):
        module.eval()
    return Pose2VideoPipeline(models.vae, models.image_encoder, models.clip_image_processor, models.reference_unet,
                              models.denoising_unet, models.pose_guider, build_scheduler(scheduler), pose_scaling="unit")


def randomize_motion_modules(models: VideoModels) -> None:
    """Motion modules start as identities; give them weights that mix frames."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in models.denoising_unet.motion_module_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.fixture(scope="module")
def pipeline() -> Pose2VideoPipeline:
    models = build_video_models({"kind": "tiny", "seed": 0})
    randomize_motion_modules(models)
    return pipeline_of(models)


@pytest.fixture(scope="module")
def frame_independent_pipeline() -> Pose2VideoPipeline:
    """A stage-1 model: no motion modules, so each frame's prediction depends on that frame alone."""
    return pipeline_of(build_video_models({"kind": "tiny", "seed": 0}, use_motion_module=False))


def inputs(num_frames: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
            rng.integers(0, 256, (num_frames, SIZE, SIZE, 3), dtype=np.uint8))


def run(pipeline: Pose2VideoPipeline, reference: np.ndarray, poses: np.ndarray, seed: int = 0, **kwargs) -> np.ndarray:
    kwargs = {"num_inference_steps": 2, "progress": False, **kwargs}
    return pipeline(reference, poses, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_output_is_uint8_frames_and_a_seed_fixes_it(pipeline):
    reference, poses = inputs(5)
    frames = run(pipeline, reference, poses)
    assert frames.shape == (5, SIZE, SIZE, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, run(pipeline, reference, poses))
    assert not np.array_equal(frames, run(pipeline, reference, poses, seed=1))
    resized = run(pipeline, reference, poses[:2], width=48, height=32)
    assert resized.shape == (2, 32, 48, 3)


def test_context_windows_cover_every_frame_and_blend_to_one():
    assert context_windows(40, 16, 4) == [slice(0, 16), slice(12, 28), slice(24, 40)]
    assert context_windows(17, 16, 4) == [slice(0, 16), slice(1, 17)]
    assert context_windows(10, 16, 4) == [slice(0, 10)]
    weights = window_weights(16, 4)
    assert weights.tolist() == [1, 2, 3, 4, 5] + [5] * 6 + [5, 4, 3, 2, 1]
    schedule = context_schedule("blended", 40, 16, 4, guided=True)
    assert [window.tolist() for window in schedule.windows] == [list(range(0, 16)), list(range(12, 28)),
                                                               list(range(24, 40))]
    total = torch.zeros(40)
    for window, blend in zip(schedule.windows, schedule.weights):
        total[window] += blend
    torch.testing.assert_close(total, torch.ones(40))
    assert not schedule.average_by_count
    with pytest.raises(AniPortraitError, match="context_overlap"):
        context_windows(40, 16, 16)


def test_windowed_long_video_equals_one_window_where_frames_are_independent(frame_independent_pipeline):
    reference, poses = inputs(20)
    one_window = run(frame_independent_pipeline, reference, poses, context_frames=20)
    windowed = run(frame_independent_pipeline, reference, poses, context_frames=8, context_overlap=3)
    assert np.abs(one_window.astype(int) - windowed.astype(int)).max() <= 1  # blending only rounds


def test_a_video_of_one_window_does_not_depend_on_the_context_size(pipeline):
    reference, poses = inputs(12)
    np.testing.assert_array_equal(run(pipeline, reference, poses, context_frames=12),
                                  run(pipeline, reference, poses, context_frames=16, context_overlap=8))
    # with motion modules, windows that do not cover the whole video change the result: the test above is not vacuous
    assert not np.array_equal(run(pipeline, reference, poses, context_frames=12),
                              run(pipeline, reference, poses, context_frames=6, context_overlap=2))


def test_unconditional_branch_sees_neither_the_reference_tokens_nor_its_clip_embedding(pipeline):
    reference, poses = inputs(4)
    other_reference, _ = inputs(4, seed=7)
    # guidance 0 keeps only the unconditional prediction: it must not depend on the reference image at all
    np.testing.assert_array_equal(run(pipeline, reference, poses, guidance_scale=0.0),
                                  run(pipeline, other_reference, poses, guidance_scale=0.0))
    assert not np.array_equal(run(pipeline, reference, poses, guidance_scale=3.5),
                              run(pipeline, other_reference, poses, guidance_scale=3.5))
    assert pipeline.reference_control.read_state is None and not pipeline.reference_control.bank  # cleared after


def test_any_diffusers_scheduler_from_config():
    models = build_video_models({"kind": "tiny", "seed": 0})
    euler = pipeline_of(models, {"_target_": "diffusers.EulerAncestralDiscreteScheduler", "prediction_type": "v_prediction",
                                 "timestep_spacing": "trailing", "rescale_betas_zero_snr": True})
    reference, poses = inputs(3)
    frames = run(euler, reference, poses)
    assert frames.shape == (3, SIZE, SIZE, 3)
    np.testing.assert_array_equal(frames, run(euler, reference, poses))  # the generator also seeds the sampler
    with pytest.raises(AniPortraitError, match="not a diffusers scheduler"):
        build_scheduler({"_target_": "collections.OrderedDict"})


def test_bad_inputs_are_refused_with_the_fix(pipeline):
    reference, poses = inputs(2)
    with pytest.raises(AniPortraitError, match="multiple of 8"):
        run(pipeline, reference, poses, width=60)
    with pytest.raises(AniPortraitError, match=r"uint8 RGB \(H, W, 3\)"):
        run(pipeline, reference.astype(np.float32), poses)
    with pytest.raises(AniPortraitError, match=r"pose_images must be uint8 RGB \(T, H, W, 3\)"):
        run(pipeline, reference, poses[0])
