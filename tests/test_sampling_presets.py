"""Sampling presets end to end: a bundle imported from (fixture) official release files samples with the official
preset without being asked and gives the official pipeline's latents; streaming writes the whole video as one
sequence of context windows unless chunks are asked for (which change frames); a bundle's own VAE is used."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import REPO, CollectingWriter
from hydra import compose, initialize_config_dir
from official_fixtures import case_inputs, denoise, load_models, write_official_bundle

from aniportrait.bundle import Bundle, export_bundle
from aniportrait.cli import options_from_config
from aniportrait.errors import AniPortraitError
from aniportrait.face.portrait import Portrait
from aniportrait.inference import AnimationOptions, Sampling, draw_pose_images, generate_video
from aniportrait.inference import generate as generate_module
from aniportrait.models.video_backbone import build_video_models
from aniportrait.pipelines.pose2video import Pose2VideoPipeline

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def official_models() -> dict[str, torch.nn.Module]:
    return load_models()


@pytest.fixture(scope="module")
def official_bundle(official_models, tmp_path_factory) -> Bundle:
    return Bundle.open(write_official_bundle(official_models, tmp_path_factory.mktemp("official_release")))


@pytest.fixture(scope="module")
def official_pipeline(official_bundle) -> Pose2VideoPipeline:
    return Pose2VideoPipeline.from_bundle(official_bundle, "cpu")  # the bundle's scheduler: inference_v2's DDIM


def test_an_imported_release_samples_as_official_without_flags(official_bundle, official_pipeline):
    assert official_bundle.settings["video"]["sampling"] == "official"
    assert official_pipeline.preset.name == "official"
    call, arrays = case_inputs("long")
    latents = denoise(official_pipeline, call, arrays)
    torch.testing.assert_close(latents, torch.from_numpy(arrays["latents"]), atol=1e-4, rtol=0)


class _Frames:
    """Pose images held in memory, as a PoseFrames."""

    def __init__(self, images: np.ndarray):
        self.images, self.size = images, images.shape[1:3]

    def __len__(self) -> int:
        return len(self.images)

    def render(self, indices: np.ndarray) -> np.ndarray:
        return self.images[indices]


def test_the_official_preset_streams_one_sequence_and_chunks_change_frames(official_pipeline, monkeypatch, tmp_path):
    _, arrays = case_inputs("long")
    poses = arrays["pose_images"][:30]
    rng = np.random.default_rng(0)
    lmks = np.concatenate([rng.uniform(0.2, 0.8, (478, 2)), np.zeros((478, 1))], axis=1).astype(np.float32)
    portrait = Portrait(arrays["reference_image"], lmks, np.zeros((468, 3), np.float32), np.eye(4, dtype=np.float32),
                        np.zeros(52, np.float32))
    monkeypatch.setattr(generate_module, "EncoderProcess", CollectingWriter)
    options = AnimationOptions(width=64, height=64, steps=2, guidance=3.5, seed=5, progress=False)
    assert Sampling.resolve(options, official_pipeline.video_settings).chunk_frames is None
    generate_video(official_pipeline, portrait, _Frames(poses), tmp_path / "out.mp4", 30.0, None, options)
    whole = np.stack(CollectingWriter.written)
    expected = official_pipeline(portrait.image, poses, draw_pose_images(lmks[None, :468, :2], (64, 64))[0],
                                 num_inference_steps=2, guidance_scale=3.5, generator=torch.Generator().manual_seed(5),
                                 width=64, height=64, progress=False)
    np.testing.assert_array_equal(whole, expected)
    generate_video(official_pipeline, portrait, _Frames(poses), tmp_path / "out.mp4", 30.0, None,
                   dataclasses.replace(options, chunk_frames=16, chunk_overlap=4))
    chunked = np.stack(CollectingWriter.written)
    assert chunked.shape == whole.shape
    assert np.abs(chunked.astype(int) - whole).max() > 10  # other windows, a cross-fade: other frames


def test_sampling_option_overrides_the_bundle_and_names_are_checked(official_pipeline):
    assert Sampling.resolve(AnimationOptions(sampling="project"), official_pipeline.video_settings).chunk_frames == 120
    with pytest.raises(AniPortraitError, match="sampling='blend'"):
        Sampling.resolve(AnimationOptions(sampling="blend"), {})
    with pytest.raises(AniPortraitError, match="context_frames=auto"):
        official_pipeline(np.zeros((64, 64, 3), np.uint8), np.zeros((20, 64, 64, 3), np.uint8), context_frames="auto",
                          num_inference_steps=1, progress=False)


def test_a_bundle_with_its_own_vae_decodes_with_it(tmp_path):
    """The lead's trained-VAE bundles (backbones without a pretrained VAE): the bundle's ``vae`` component replaces
    the base models' VAE; the image encoder still comes from base_models.video."""
    base = {"kind": "tiny", "seed": 0}
    models = build_video_models(base, use_motion_module=False)
    own_vae = build_video_models({"kind": "tiny", "seed": 7}, use_motion_module=False).vae
    assert not torch.equal(own_vae.decoder.conv_out.weight, models.vae.decoder.conv_out.weight)
    path = export_bundle(tmp_path / "bundle", {"reference_unet": models.reference_unet,
                                               "denoising_unet": models.denoising_unet,
                                               "pose_guider": models.pose_guider, "vae": own_vae},
                         settings={"video": {"pose_scaling": "unit"}}, base_models={"video": base})
    pipeline = Pose2VideoPipeline.from_bundle(path, "cpu")
    loaded = pipeline.vae.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in own_vae.state_dict().items())
    assert torch.equal(pipeline.image_encoder.vision_model.embeddings.patch_embedding.weight,
                       models.image_encoder.vision_model.embeddings.patch_embedding.weight)
    assert pipeline.preset.name == "project"  # bundles trained here sample with the project preset


def test_infer_py_keys_reach_the_options():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        default = AnimationOptions.from_kwargs(**options_from_config(compose(config_name="infer")))
        chosen = AnimationOptions.from_kwargs(**options_from_config(compose(
            config_name="infer", overrides=["sampling=official", "stream.chunk_frames=12"])))
    assert (default.sampling, default.chunk_frames) == (None, None)  # the bundle's preset, and its streaming default
    assert (chosen.sampling, chosen.chunk_frames) == ("official", 12)
