"""Audio2Mesh / Audio2Pose: official fixtures, official key layouts, legacy keys, cached decoding."""

import json

import numpy as np
import pytest
import torch
from conftest import shared_path
from safetensors.torch import load_file

from aniportrait.face.geometry import smooth_pose_sequence
from aniportrait.models.audio2mesh import Audio2Mesh
from aniportrait.models.audio2pose import Audio2Pose, alibi_causal_mask
from aniportrait.models.checkpoints import load_state_dict_checked
from aniportrait.models.wav2vec2 import BASE_960H_CONFIG, upgrade_weight_norm_keys


def _fixture(name):
    folder = shared_path("reference", "fixtures", name)
    spec = json.loads((folder / "fixture.json").read_text())
    config = {k: v for k, v in spec["wav2vec2_config"].items() if not k.startswith("_") and k != "architectures"}
    return folder, spec, config


def _official_config():
    return {k: v for k, v in json.loads(BASE_960H_CONFIG.read_text()).items() if not k.startswith("_")}


def test_audio2mesh_fixture_reproduces():
    folder, spec, config = _fixture("audio2mesh")
    model = Audio2Mesh(wav2vec2_config=config, latent_dim=spec["config"]["latent_dim"]).eval()
    load_state_dict_checked(model, load_file(folder / "weights.safetensors"), "audio2mesh fixture")
    io = load_file(folder / "io.safetensors")
    values = io["input_values"][None]
    torch.testing.assert_close(model.audio_encoder.frame_features(values, 30), io["interpolated_features"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.infer(values, 30), io["output"], atol=1e-4, rtol=1e-4)
    all_layers = Audio2Mesh(wav2vec2_config=config, latent_dim=16, only_last_features=False).eval()
    all_layers.load_state_dict(model.state_dict())
    torch.testing.assert_close(all_layers.infer(values, 30), io["output_all_layer_mean_variant"], atol=1e-4, rtol=1e-4)


def test_audio2pose_fixture_reproduces():
    folder, spec, config = _fixture("audio2pose")
    model = Audio2Pose(wav2vec2_config=config, latent_dim=spec["config"]["latent_dim"]).eval()
    load_state_dict_checked(model, load_file(folder / "weights.safetensors"), "audio2pose fixture")
    io = load_file(folder / "io.safetensors")
    values = io["input_values"][None]
    cached = model.infer(values, 20, io["id_seed"])
    torch.testing.assert_close(cached, io["output"], atol=1e-4, rtol=0)
    torch.testing.assert_close(model.infer_reference(values, 20, io["id_seed"]), io["output"], atol=1e-4, rtol=0)
    post = cached.squeeze(0).numpy().copy()
    post[:, :3] *= 0.5
    np.testing.assert_allclose(smooth_pose_sequence(post, 7), io["postprocessed_like_audio2vid"].numpy(), atol=1e-4)


def test_teacher_forcing_equals_decoding_on_own_predictions():
    _, _, config = _fixture("audio2pose")
    torch.manual_seed(0)
    model = Audio2Pose(wav2vec2_config=config, latent_dim=16).eval()
    values = torch.randn(2, 16000)
    identity = torch.tensor([3, 7])
    decoded = model.infer(values, 25, identity)
    with torch.no_grad():
        teacher = model(values, decoded, identity)
    torch.testing.assert_close(teacher, decoded, atol=1e-5, rtol=1e-5)


def test_prefix_poses_continue_a_decode():
    _, _, config = _fixture("audio2pose")
    torch.manual_seed(1)
    model = Audio2Pose(wav2vec2_config=config, latent_dim=16).eval()
    values = torch.randn(1, 16000)
    identity = torch.tensor([0])
    free = model.infer(values, 20, identity)
    forced = model.infer(values, 20, identity, prefix_poses=free[:, :8])
    torch.testing.assert_close(forced, free, atol=1e-5, rtol=1e-5)
    other = model.infer(values, 20, identity, prefix_poses=torch.full((1, 8, 6), 5.0))
    assert not torch.allclose(other[:, 9:], free[:, 9:])


def test_alibi_mask_matches_official_construction():
    mask = alibi_causal_mask(8, 6)
    slopes = [0.5 ** (i + 1) for i in range(8)]
    for head, slope in enumerate(slopes):
        for i in range(6):
            for j in range(6):
                expected = -slope * (i - j) if j <= i else float("-inf")
                assert mask[head, i, j].item() == pytest.approx(expected)


@pytest.mark.parametrize("cls,manifest", [(Audio2Mesh, "audio2mesh"), (Audio2Pose, "audio2pose")])
def test_full_size_keys_and_shapes_equal_release(cls, manifest):
    expected = json.loads(shared_path("reference", "official_checkpoints", f"{manifest}.json").read_text())
    with torch.device("meta"):
        model = cls(wav2vec2_config=_official_config(), latent_dim=512)
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert ours == expected


@pytest.mark.parametrize("cls,manifest", [(Audio2Mesh, "audio2mesh"), (Audio2Pose, "audio2pose")])
def test_legacy_weight_norm_keys_load(cls, manifest):
    legacy = json.loads(shared_path("reference", "official_checkpoints", f"{manifest}.legacy_weight_norm.json").read_text())
    with torch.device("meta"):
        model = cls(wav2vec2_config=_official_config(), latent_dim=512)
    upgraded = upgrade_weight_norm_keys({key: torch.empty(0) for key in legacy})
    assert set(upgraded) == set(model.state_dict())
