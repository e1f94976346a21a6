"""Ablations cut exactly their path: the output changes when, and only when, the cut path carried something."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aniportrait.errors import AniPortraitError
from aniportrait.models.video_backbone import build_video_models
from aniportrait.pipelines.ablation import ablated
from aniportrait.pipelines.pose2video import Pose2VideoPipeline, build_scheduler


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)


@pytest.fixture(scope="module")
def pipeline() -> Pose2VideoPipeline:
    models = build_video_models({"kind": "tiny", "seed": 0})
    for index, module in enumerate((models.reference_unet, models.denoising_unet, models.pose_guider)):
        randomize(module, seed=index)  # trained-looking weights: every path carries something
    return Pose2VideoPipeline(models.vae.eval(), models.image_encoder, models.clip_image_processor,
                              models.reference_unet.eval(), models.denoising_unet.eval(), models.pose_guider.eval(),
                              build_scheduler(), pose_scaling="unit")


def inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8))


def generate(pipeline: Pose2VideoPipeline, *cut: str) -> np.ndarray:
    reference, poses = inputs()
    with ablated(pipeline, *cut):
        return pipeline(reference, poses, num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                        progress=False)


@pytest.mark.parametrize("path", ["pose_guider", "reference", "motion_modules"])
def test_each_cut_changes_the_frames_and_is_undone_afterwards(pipeline, path):
    full = generate(pipeline)
    cut = generate(pipeline, path)
    assert np.abs(cut.astype(int) - full.astype(int)).max() > 0, path
    assert np.array_equal(generate(pipeline), full), "the pipeline was not restored"


def test_the_kept_reference_pass_never_crosses_a_reference_cut(pipeline):
    """The pipeline keeps a call's reference pass for the next call with the same reference: a cut reference must
    neither reuse a full call's pass nor leave its empty bank for the full call after it."""
    pipeline.forget_reference()
    cut_first = generate(pipeline, "reference")
    full = generate(pipeline)  # after a cut call: runs its own reference pass
    assert np.abs(cut_first.astype(int) - full.astype(int)).max() > 0
    assert np.array_equal(generate(pipeline, "reference"), cut_first)  # after a full call: still cut
    assert np.array_equal(generate(pipeline), full)


def test_a_cut_changes_nothing_where_its_path_carries_nothing():
    models = build_video_models({"kind": "tiny", "seed": 0})
    randomize(models.reference_unet, seed=0)
    randomize(models.denoising_unet, seed=1)
    for module in models.denoising_unet.modules():  # motion modules as initialised: zero output projections
        if type(module).__name__ == "VanillaTemporalModule":
            for param in module.parameters():
                param.data.zero_()
    with torch.no_grad():  # a PoseGuider whose features are all zero
        for param in models.pose_guider.parameters():
            param.zero_()
    pipe = Pose2VideoPipeline(models.vae.eval(), models.image_encoder, models.clip_image_processor,
                              models.reference_unet.eval(), models.denoising_unet.eval(), models.pose_guider.eval(),
                              build_scheduler(), pose_scaling="unit")
    full = generate(pipe)
    assert np.array_equal(generate(pipe, "motion_modules"), full)
    assert np.array_equal(generate(pipe, "pose_guider"), full)
    assert not np.array_equal(generate(pipe, "reference"), full)  # the ReferenceNet still carries the portrait


def test_unknown_ablations_are_refused(pipeline):
    with pytest.raises(AniPortraitError, match="unknown"), ablated(pipeline, "clip"):
        pass
