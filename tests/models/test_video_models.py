"""Landmark-to-video models: official layouts and numerics, motion modules, reference attention, loading."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import MotionAdapter, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from safetensors.torch import load_file, save_file

from aniportrait.errors import AniPortraitError
from aniportrait.models.checkpointing import parse_checkpointing, set_gradient_checkpointing
from aniportrait.models.checkpoints import load_state_dict_checked, read_checkpoint
from aniportrait.models.motion_module import (
    VanillaTemporalModule,
    diffusers_to_official_keys,
    official_to_diffusers_keys,
)
from aniportrait.models.pose_guider import PoseGuider
from aniportrait.models.pose_image_scaling import scale_pose_images
from aniportrait.models.reference_attention import ReferenceAttentionControl, self_attention_paths
from aniportrait.models.reference_unet import ReferenceNet
from aniportrait.models.unet3d import MOTION_MODULE_KEYS, UNet3DConditionModel
from aniportrait.models.video_backbone import TINY_UNET_CONFIG, build_video_models
from aniportrait.utils.pixels import to_signed_unit

SHARED = Path(os.environ.get("ANIPORTRAIT_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))
OFFICIAL = SHARED / "reference" / "official_checkpoints"
FIXTURE = SHARED / "reference" / "fixtures" / "pose_guider"
needs_shared = pytest.mark.skipif(not OFFICIAL.is_dir(), reason=f"official reference data not found at {SHARED}")


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere (zero-initialised outputs would hide the computation under test)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def _tiny_unet3d(**kwargs) -> UNet3DConditionModel:
    torch.manual_seed(0)
    return UNet3DConditionModel.from_unet2d_config(TINY_UNET_CONFIG, **kwargs)


# -- PoseGuider ---------------------------------------------------------------------------------------------

@needs_shared
def test_pose_guider_reproduces_official_fixture():
    weights, io = load_file(str(FIXTURE / "weights.safetensors")), load_file(str(FIXTURE / "io.safetensors"))
    model = PoseGuider(noise_latent_channels=32, attention_num_heads=2, attention_head_dim=24)
    load_state_dict_checked(model, weights, "pose_guider fixture")
    tolerance = {"atol": 1e-4, "rtol": 1e-4}

    with torch.no_grad():
        for index, feature in enumerate(model.eval()(io["x"], io["ref_x"])):
            torch.testing.assert_close(feature, io[f"eval_out_{index}"], **tolerance)
        trained = copy.deepcopy(model).train()
        for index, feature in enumerate(trained(io["x_train"], io["ref_x_train"])):
            torch.testing.assert_close(feature, io[f"train_out_{index}"], **tolerance)
    state = trained.state_dict()
    for key, value in io.items():
        if key.startswith("bn_after_train_forward."):
            torch.testing.assert_close(state[key.removeprefix("bn_after_train_forward.")], value, **tolerance)
    with torch.no_grad():
        for index, feature in enumerate(trained.eval()(io["x"], io["ref_x"])):
            torch.testing.assert_close(feature, io[f"eval_out_after_train_step_{index}"], **tolerance)


def test_pose_guider_reference_pose_official_vs_cross():
    torch.manual_seed(0)
    official = PoseGuider(noise_latent_channels=32, attention_num_heads=2, attention_head_dim=16).eval()
    cross = PoseGuider(noise_latent_channels=32, attention_num_heads=2, attention_head_dim=16,
                       reference_attention="cross").eval()
    extra = set(cross.state_dict()) - set(official.state_dict())
    assert extra and all(".attn2." in key or ".norm2." in key for key in extra)
    assert not set(official.state_dict()) - set(cross.state_dict())
    _randomize(official)
    load_state_dict_checked(cross, official.state_dict(), "cross from official", allow_missing=(r".*\.(attn2|norm2)\.",))
    for block in (cross.cross_attn1, cross.cross_attn2, cross.cross_attn3, cross.cross_attn4):
        torch.nn.init.zeros_(block.transformer_blocks[0].attn2.to_out[0].weight)
        torch.nn.init.zeros_(block.transformer_blocks[0].attn2.to_out[0].bias)
    poses, ref_a, ref_b = torch.randn(2, 3, 2, 64, 64), torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        base = official(poses, ref_a)
        assert all(torch.equal(a, b) for a, b in zip(base, official(poses, ref_b)))  # the reference is ignored
        assert all(torch.equal(a, b) for a, b in zip(base, official(poses)))
        # zero-initialised attn2 output: cross mode starts as the official model ...
        for a, b in zip(base, cross(poses, ref_a)):
            torch.testing.assert_close(a, b)
        torch.nn.init.normal_(cross.cross_attn1.transformer_blocks[0].attn2.to_out[0].weight, std=0.5)
        # ... and once trained, it depends on the reference pose
        assert not torch.allclose(cross(poses, ref_a)[1], cross(poses, ref_b)[1])
    with pytest.raises(AniPortraitError, match="needs ref_x"):
        cross(poses)


def test_pose_image_scaling_modes():
    pose = torch.tensor([0, 128, 255], dtype=torch.uint8)
    torch.testing.assert_close(scale_pose_images(pose, "unit"), torch.tensor([-1.0, 128 / 255 * 2 - 1, 1.0]))
    torch.testing.assert_close(scale_pose_images(pose.numpy(), "official_inference"), torch.tensor([-1.0, 255.0, 509.0]))
    with pytest.raises(AniPortraitError, match="unknown"):
        scale_pose_images(pose, "imagenet")
    # integer input goes through one buffer and in-place operations: bit for bit the float path's values
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 8, 6, 3), dtype=np.uint8))
    for mode in ("unit", "official_inference"):
        permuted = images.permute(0, 3, 1, 2)
        assert torch.equal(scale_pose_images(permuted, mode), scale_pose_images(permuted.float(), mode))
    assert torch.equal(to_signed_unit(images.numpy()), images.permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    assert to_signed_unit(images).is_contiguous() and to_signed_unit(images).shape == (3, 3, 8, 6)


# -- official key layouts (full size, meta device) ----------------------------------------------------------

def _sd15_config() -> dict:
    config = json.loads((OFFICIAL / "configs" / "sd15_unet_config.json").read_text())
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _inference_v2_kwargs() -> dict:
    return json.loads((OFFICIAL / "configs" / "inference_v2_unet_additional_kwargs.json").read_text())


def _full_size_model(name: str) -> torch.nn.Module:
    extra = _inference_v2_kwargs()
    motion = {"motion_module_kwargs": extra["motion_module_kwargs"],
              "motion_module_resolutions": extra["motion_module_resolutions"],
              "motion_module_mid_block": extra["motion_module_mid_block"]}
    with torch.device("meta"):
        if name == "reference_unet":
            return ReferenceNet(**_sd15_config())
        if name == "denoising_unet":
            return UNet3DConditionModel.from_unet2d_config(_sd15_config(), use_motion_module=False)
        if name in ("denoising_unet_full", "motion_module"):
            return UNet3DConditionModel.from_unet2d_config(_sd15_config(), **motion)
        return PoseGuider()


@needs_shared
@pytest.mark.parametrize("name", ["reference_unet", "denoising_unet", "denoising_unet_full", "motion_module", "pose_guider"])
def test_full_size_key_layout_matches_official_manifest(name):
    model = _full_size_model(name)
    manifest = json.loads((OFFICIAL / f"{name}.json").read_text())
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    if name == "motion_module":  # the official stage-2 save filter
        ours = {key: shape for key, shape in ours.items() if "motion_module" in key}
    assert sorted(set(ours) - set(manifest)) == [] and sorted(set(manifest) - set(ours)) == []
    assert {key: shape for key, shape in ours.items() if manifest[key] != shape} == {}


# -- UNet3D -------------------------------------------------------------------------------------------------

def test_fresh_unet3d_equals_unet2d_per_frame():
    torch.manual_seed(0)
    unet2d = UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
    unet3d = UNet3DConditionModel.from_unet2d(unet2d).eval()
    assert len([name for name, _ in unet3d.named_modules() if name.endswith(".temporal_transformer")]) == 4 * 1 + 1 + 4 * 2
    latents, context, timesteps = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 1, 32), torch.tensor([10, 700])
    with torch.no_grad():
        video = unet3d(latents, timesteps, context).sample
        frames = torch.stack([unet2d(latents[:, :, i], timesteps, context).sample for i in range(3)], dim=2)
    torch.testing.assert_close(video, frames, atol=1e-5, rtol=1e-5)


def _record_calls(module: torch.nn.Module, prefix: str) -> list[str]:
    """Names (relative to ``prefix``) of the block's resnets, attentions and motion modules, in call order."""
    calls: list[str] = []
    for name, child in module.named_modules():
        relative = name.removeprefix(prefix)
        if name.startswith(prefix) and re.fullmatch(r"(resnets|attentions|motion_modules)\.\d+", relative):
            child.register_forward_hook(lambda _m, _i, _o, relative=relative: calls.append(relative))
    return calls


def test_unet3d_layer_order_follows_official_blocks():
    unet = _tiny_unet3d().eval()
    mid_calls, down_calls, up_calls = (_record_calls(unet, "mid_block."), _record_calls(unet, "down_blocks.0."),
                                       _record_calls(unet, "up_blocks.1."))
    with torch.no_grad():
        unet(torch.randn(1, 4, 2, 8, 8), 5, torch.randn(1, 1, 32))
    assert mid_calls == ["resnets.0", "attentions.0", "motion_modules.0", "resnets.1"]
    assert down_calls == ["resnets.0", "attentions.0", "motion_modules.0"]
    assert up_calls == ["resnets.0", "attentions.0", "motion_modules.0", "resnets.1", "attentions.1", "motion_modules.1"]


@pytest.mark.parametrize("index", range(5))
def test_pose_features_are_added_after_conv_in_and_each_down_block(index):
    unet = _tiny_unet3d().eval()
    stage_inputs = [unet.down_blocks[i].resnets[0] for i in range(4)] + [unet.mid_block.resnets[0]]
    captured: list[torch.Tensor] = []
    stage_inputs[index].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    latents, context = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 1, 32)
    shapes = [(32, 8), (32, 4), (64, 2), (128, 1), (128, 1)]
    pose = [torch.zeros(1, c, 2, s, s) for c, s in shapes]
    pose[index] = torch.randn(1, *pose[index].shape[1:])
    with torch.no_grad():
        unet(latents, 5, context)
        unet(latents, 5, context, pose_cond_fea=pose)
    torch.testing.assert_close(captured[1] - captured[0], pose[index].permute(0, 2, 1, 3, 4).flatten(0, 1))


def test_deep_features_reproduce_the_whole_unet_from_its_top_level():
    """keep_deep_features returns the last up block's input; given back with the same inputs, the top level alone
    (conv_in, down block 0 without its downsampler, the last up block) gives the whole forward's output exactly,
    and runs none of the deeper layers. With other latents it gives another output (the top level sees them)."""
    unet = _tiny_unet3d().eval()  # its own init: _randomize's weights blow the deep features up to 1e6, drowning
    # the top level's own skip features
    latents, context = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 1, 32)
    shapes = [(32, 8), (32, 4), (64, 2), (128, 1), (128, 1)]
    pose = [torch.randn(2, c, 3, size, size) for c, size in shapes]
    deep_calls: list[int] = []
    for module in (unet.mid_block.resnets[0], unet.down_blocks[1].resnets[0], unet.up_blocks[-2].resnets[0]):
        module.register_forward_hook(lambda *_: deep_calls.append(1))
    with torch.no_grad():
        whole = unet(latents, 7, context, pose_cond_fea=pose, keep_deep_features=True)
        assert len(deep_calls) == 3 and whole.deep_features.shape == (2 * 3, 64, 8, 8)  # up block 2, upsampled
        assert unet(latents, 7, context, pose_cond_fea=pose).deep_features is None  # only when asked for
        deep_calls.clear()
        top = unet(latents, 7, context, pose_cond_fea=pose, deep_features=whole.deep_features)
        assert deep_calls == [] and top.deep_features is None
        torch.testing.assert_close(top.sample, whole.sample, rtol=0, atol=0)
        moved = unet(torch.randn_like(latents), 7, context, pose_cond_fea=pose, deep_features=whole.deep_features)
        assert (moved.sample - whole.sample).abs().mean() > 1e-3
        with pytest.raises(AniPortraitError, match="deep_features"):
            unet(latents[:1], 7, context[:1], pose_cond_fea=[f[:1] for f in pose], deep_features=whole.deep_features)


def test_stage1_checkpoint_loads_with_only_motion_modules_missing(tmp_path):
    stage1 = _tiny_unet3d(use_motion_module=False)
    full = _tiny_unet3d()
    path = tmp_path / "denoising_unet.pth"
    torch.save(stage1.state_dict(), path)
    report = load_state_dict_checked(full, read_checkpoint(path), "denoising_unet", allow_missing=(MOTION_MODULE_KEYS,))
    motion_parameters = {name for name, p in full.named_parameters() if any(p is q for q in full.motion_module_parameters())}
    assert motion_parameters == {key for key in report.missing if not key.endswith(".pe")}
    assert report.missing and all(".motion_modules." in key for key in report.missing)
    assert torch.equal(full.conv_out.weight, stage1.conv_out.weight)
    damaged = {key: value for key, value in stage1.state_dict().items() if key != "conv_in.weight"}
    with pytest.raises(AniPortraitError, match=r"missing keys: conv_in\.weight"):
        load_state_dict_checked(full, damaged, "denoising_unet", allow_missing=(MOTION_MODULE_KEYS,))


def test_unet3d_config_round_trip_and_gradient_checkpointing(tmp_path):
    unet = _tiny_unet3d()
    _randomize(unet, seed=1)
    unet.save_pretrained(tmp_path / "unet3d")
    loaded = UNet3DConditionModel.from_pretrained(tmp_path / "unet3d")
    rebuilt = UNet3DConditionModel(**{k: v for k, v in unet.config.items() if not k.startswith("_")})
    assert set(rebuilt.state_dict()) == set(unet.state_dict())
    latents, context = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 1, 32)

    def gradients(model):
        model.train().zero_grad()
        model(latents, 3, context).sample.square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients(loaded)
    loaded.enable_gradient_checkpointing()
    assert loaded.gradient_checkpointing and loaded.down_blocks[0].attentions[0].gradient_checkpointing
    checkpointed = gradients(loaded)
    assert plain.keys() == checkpointed.keys() and any(".motion_modules." in name for name in plain)
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-5, rtol=1e-4)



@pytest.mark.parametrize("kind", ["unet3d", "reference_net"])
def test_checkpointing_at_chosen_levels_recomputes_only_there_and_keeps_the_gradients(kind):
    torch.manual_seed(0)
    if kind == "unet3d":
        unet = _tiny_unet3d()
        inputs = (torch.randn(1, 4, 2, 8, 8), 3, torch.randn(1, 1, 32))
    else:
        unet = ReferenceNet(**{k: v for k, v in TINY_UNET_CONFIG.items() if not k.startswith("_")})
        inputs = (torch.randn(1, 4, 8, 8), 3, torch.randn(1, 1, 32))
    _randomize(unet, seed=2)
    calls: dict[str, int] = {}
    for name, module in unet.named_modules():
        if name.endswith("resnets.0"):
            module.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))

    def step(setting):
        set_gradient_checkpointing(unet, setting)
        unet.train().zero_grad()
        calls.clear()
        out = unet(*inputs)
        out = out.sample if hasattr(out, "sample") else out[0]
        out.square().mean().backward()
        return {name: p.grad.clone() for name, p in unet.named_parameters() if p.grad is not None}, dict(calls)

    plain, plain_calls = step(False)
    top, top_calls = step([0])
    assert set(plain_calls.values()) == {1}
    deepest = len(unet.down_blocks) - 1
    assert top_calls["down_blocks.0.resnets.0"] == 2 and top_calls[f"up_blocks.{deepest}.resnets.0"] == 2
    assert top_calls["down_blocks.1.resnets.0"] == 1 and top_calls["up_blocks.0.resnets.0"] == 1
    every, every_calls = step(True)
    assert every_calls["down_blocks.1.resnets.0"] == 2
    for name in plain:  # checkpointing never changes the function
        torch.testing.assert_close(top[name], plain[name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(every[name], plain[name], atol=1e-5, rtol=1e-4)
    with pytest.raises(AniPortraitError, match=r"levels \[7\].*levels 0\.\.3"):
        set_gradient_checkpointing(unet, [7])
    with pytest.raises(AniPortraitError, match="model.gradient_checkpointing='top'"):
        parse_checkpointing("top")


# -- motion module ------------------------------------------------------------------------------------------

def _official_motion_module(x: torch.Tensor, weights: dict, heads: int) -> torch.Tensor:
    """The official VanillaTemporalModule forward, written out op by op. x: (b, c, f, h, w)."""
    b, c, f, h, w = x.shape
    w_ = {key.removeprefix("temporal_transformer."): value for key, value in weights.items()}
    hidden = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # b c f h w -> (b f) c h w
    residual = hidden
    hidden = F.group_norm(hidden, 32, w_["norm.weight"], w_["norm.bias"], eps=1e-6)
    hidden = hidden.permute(0, 2, 3, 1).reshape(b * f, h * w, c)
    hidden = F.linear(hidden, w_["proj_in.weight"], w_["proj_in.bias"])
    block = "transformer_blocks.0."
    for k in range(2):
        attn = f"{block}attention_blocks.{k}."
        normed = F.layer_norm(hidden, (c,), w_[f"{block}norms.{k}.weight"], w_[f"{block}norms.{k}.bias"])
        tokens = normed.reshape(b, f, h * w, c).permute(0, 2, 1, 3).reshape(b * h * w, f, c)  # (b d) f c
        tokens = tokens + w_[f"{attn}pos_encoder.pe"][:, :f]
        q, key, v = (F.linear(tokens, w_[f"{attn}to_{n}.weight"]).reshape(b * h * w, f, heads, c // heads).transpose(1, 2)
                     for n in "qkv")
        scores = (q @ key.transpose(-1, -2) / math.sqrt(c // heads)).softmax(-1)
        out = (scores @ v).transpose(1, 2).reshape(b * h * w, f, c)
        out = F.linear(out, w_[f"{attn}to_out.0.weight"], w_[f"{attn}to_out.0.bias"])
        hidden = out.reshape(b, h * w, f, c).permute(0, 2, 1, 3).reshape(b * f, h * w, c) + hidden
    normed = F.layer_norm(hidden, (c,), w_[f"{block}ff_norm.weight"], w_[f"{block}ff_norm.bias"])
    proj, gate = F.linear(normed, w_[f"{block}ff.net.0.proj.weight"], w_[f"{block}ff.net.0.proj.bias"]).chunk(2, -1)
    hidden = F.linear(proj * F.gelu(gate), w_[f"{block}ff.net.2.weight"], w_[f"{block}ff.net.2.bias"]) + hidden
    hidden = F.linear(hidden, w_["proj_out.weight"], w_["proj_out.bias"])
    hidden = hidden.reshape(b * f, h, w, c).permute(0, 3, 1, 2) + residual
    return hidden.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


def _module_input(b: int = 2, c: int = 64, f: int = 5, size: int = 3) -> torch.Tensor:
    scale = torch.linspace(0.5, 3.0, f).view(1, 1, f, 1, 1)  # frames with different statistics
    return torch.randn(b, c, f, size, size) * scale + scale


def test_motion_module_matches_official_forward():
    module = VanillaTemporalModule(64)
    _randomize(module)
    x = _module_input()
    with torch.no_grad():
        ours = module(x.permute(0, 2, 1, 3, 4).flatten(0, 1), num_frames=5)
        official = _official_motion_module(x, module.state_dict(), heads=8)
    torch.testing.assert_close(ours, official.permute(0, 2, 1, 3, 4).flatten(0, 1), atol=1e-4, rtol=1e-4)
    assert torch.equal(module.state_dict()["temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe"],
                       module.state_dict()["temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"])


def test_motion_module_groupnorm_is_per_frame_unlike_diffusers():
    """Loaded into diffusers' AnimateDiffTransformer3D through the key map, outputs agree exactly when every frame
    has the same per-group statistics (frames = spatial permutations of one frame) and differ otherwise: diffusers
    normalises over all frames jointly, the official module per frame."""
    module = VanillaTemporalModule(64)
    _randomize(module)
    prefix = "down_blocks.0.motion_modules.0."
    mapped = official_to_diffusers_keys({prefix + key: value for key, value in module.state_dict().items()})
    diffusers_module = AnimateDiffTransformer3D(
        num_attention_heads=8, attention_head_dim=8, in_channels=64, norm_num_groups=32, activation_fn="geglu",
        positional_embeddings="sinusoidal", num_positional_embeddings=32, double_self_attention=True)
    load_state_dict_checked(diffusers_module, {k.removeprefix(prefix): v for k, v in mapped.items()}, "diffusers")

    first = torch.randn(2, 64, 9)
    same_stats = torch.stack([first[:, :, torch.randperm(9)] for _ in range(4)], dim=1).reshape(8, 64, 3, 3)
    different_stats = _module_input(c=64, f=4).permute(0, 2, 1, 3, 4).flatten(0, 1)
    with torch.no_grad():
        torch.testing.assert_close(module(same_stats, 4), diffusers_module(same_stats, num_frames=4), atol=1e-4, rtol=1e-4)
        assert (module(different_stats, 4) - diffusers_module(different_stats, num_frames=4)).abs().max() > 1e-2
        # and our GroupNorm output for a frame does not depend on the other frames at all
        captured = []
        module.temporal_transformer.norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
        module(different_stats, 4)
        scaled = different_stats.clone()
        scaled[1:4] *= 7.0
        module(scaled, 4)
        torch.testing.assert_close(captured[0][0], captured[1][0])


def test_motion_module_key_map_round_trips_and_matches_motion_adapter():
    unet = _tiny_unet3d()
    _randomize(unet)
    official = unet.motion_module_state_dict()
    diffusers_keys = official_to_diffusers_keys(official)
    adapter = MotionAdapter(block_out_channels=TINY_UNET_CONFIG["block_out_channels"], motion_layers_per_block=1,
                            motion_mid_block_layers_per_block=1, motion_num_attention_heads=8,
                            motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=True)
    adapter_shapes = {key: tuple(value.shape) for key, value in adapter.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in diffusers_keys.items()} == adapter_shapes
    back = diffusers_to_official_keys(diffusers_keys)
    assert back.keys() == official.keys() and all(torch.equal(back[key], official[key]) for key in official)


def test_load_motion_modules_official_and_diffusers_layouts(tmp_path):
    source = _tiny_unet3d()
    _randomize(source, seed=3)
    official = source.motion_module_state_dict()
    torch.save({"state_dict": official, "global_step": 10}, tmp_path / "mm.ckpt")
    save_file(official_to_diffusers_keys(official), str(tmp_path / "mm_diffusers.safetensors"))
    for path in ("mm.ckpt", "mm_diffusers.safetensors"):
        target = _tiny_unet3d()
        before = target.conv_in.weight.clone()
        target.load_motion_modules(tmp_path / path)
        loaded = target.motion_module_state_dict()
        assert all(torch.equal(loaded[key], official[key]) for key in official)
        assert torch.equal(target.conv_in.weight, before)
    incomplete = {key: value for key, value in official.items() if not key.startswith("mid_block.")}
    with pytest.raises(AniPortraitError, match="missing keys: mid_block.motion_modules"):
        _tiny_unet3d().load_motion_modules(incomplete)
    with pytest.raises(AniPortraitError, match="no motion modules"):
        _tiny_unet3d(use_motion_module=False).load_motion_modules(official)


# -- reference attention ------------------------------------------------------------------------------------

def _controlled_pair(seed: int = 0) -> tuple[ReferenceNet, UNet3DConditionModel, ReferenceAttentionControl]:
    torch.manual_seed(seed)
    reference = ReferenceNet(**TINY_UNET_CONFIG).eval()
    denoising = UNet3DConditionModel.from_unet2d_config(TINY_UNET_CONFIG).eval()
    _randomize(denoising, seed=seed + 1)
    return reference, denoising, ReferenceAttentionControl(reference, denoising)


def test_reference_attention_with_cfg_mask_leaves_uncond_half_unreferenced():
    reference, denoising, control = _controlled_pair()
    b, f = 2, 3
    latents, context = torch.randn(2 * b, 4, f, 8, 8), torch.randn(2 * b, 1, 32)
    with torch.no_grad():
        plain = denoising(latents, 7, context).sample
        control.write()
        reference(torch.randn(2 * b, 4, 8, 8), 0, context)
        control.read(num_frames=f, uncond_mask=torch.tensor([True] * b + [False] * b))
        guided = denoising(latents, 7, context).sample
        control.read(num_frames=f)
        all_referenced = denoising(latents, 7, context).sample
    torch.testing.assert_close(guided[:b], plain[:b], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[b:], all_referenced[b:], atol=1e-5, rtol=1e-5)
    assert (guided[b:] - plain[b:]).abs().max() > 1e-3


def test_reference_attention_with_identical_tokens_is_plain_self_attention():
    """Keys/values cat([x, x]) duplicate every key with its value: softmax weights halve, the output is unchanged."""
    torch.manual_seed(0)
    writer = torch.nn.ModuleDict({"block": BasicTransformerBlock(16, 2, 8)})
    reader = copy.deepcopy(writer)
    control = ReferenceAttentionControl(writer, reader)
    assert control.paths == ("block.attn1",)
    tokens = torch.randn(2, 5, 16)  # (b, L, C) normed tokens, as attn1 receives them
    frames = tokens.repeat_interleave(3, dim=0)  # (b f, L, C): every frame equals its sample's reference
    with torch.no_grad():
        plain = reader.block.attn1(frames)
        control.write()
        writer.block.attn1(tokens)
        control.read(num_frames=3)
        referenced = reader.block.attn1(frames)
        other_frames = torch.randn(6, 5, 16)
        attended = reader.block.attn1(other_frames)
        control.clear()
        unreferenced = reader.block.attn1(other_frames)
    torch.testing.assert_close(referenced, plain, atol=1e-6, rtol=1e-5)
    assert (attended - unreferenced).abs().max() > 1e-3


def test_reference_bank_shared_by_batch_and_errors():
    reference, denoising, control = _controlled_pair()
    latents, context = torch.randn(3, 4, 2, 8, 8), torch.randn(3, 1, 32)
    ref_latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        with pytest.raises(AniPortraitError, match="call write"):
            control.read(num_frames=2)
        control.write()
        reference(ref_latents, 0, context[:1])
        control.read(num_frames=2)
        shared = denoising(latents, 7, context).sample
        control.write()
        reference(ref_latents.expand(3, -1, -1, -1), 0, context[:1].expand(3, -1, -1))
        control.read(num_frames=2)
        per_sample = denoising(latents, 7, context).sample
        torch.testing.assert_close(shared, per_sample, atol=1e-5, rtol=1e-5)
        control.read(num_frames=3)
        with pytest.raises(AniPortraitError, match="bank holds 3 reference samples"):
            denoising(torch.randn(2, 4, 2, 8, 8), 7, context[:2])
    denoising.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(AniPortraitError, match="were replaced"):
        control.write()


def test_reference_gradients_reach_reference_unet_with_checkpointing():
    reference, denoising, control = _controlled_pair()
    reference.train().enable_gradient_checkpointing()
    denoising.train().enable_gradient_checkpointing()
    context = torch.randn(1, 1, 32)
    control.write()
    reference(torch.randn(1, 4, 8, 8), 0, context)
    control.read(num_frames=2)
    denoising(torch.randn(1, 4, 2, 8, 8), 7, context).sample.square().mean().backward()
    control.clear()
    grad = reference.down_blocks[0].attentions[0].proj_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def _official_width_sorted_pairs(reference: torch.nn.Module, denoising: torch.nn.Module) -> list[tuple[str, str]]:
    """mutual_self_attention.update: DFS order, stable sort by descending width, zip readers with writers."""
    def blocks(unet):
        found = [(name, m) for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]
        return sorted(found, key=lambda item: -item[1].norm1.normalized_shape[0])
    return [(reader, writer) for (reader, _), (writer, _) in zip(blocks(denoising), blocks(reference))]


@needs_shared
def test_reference_pairing_by_path_covers_sd15_and_equals_official_width_sort():
    reference = _full_size_model("reference_unet")
    denoising = _full_size_model("denoising_unet_full")
    control = ReferenceAttentionControl(reference, denoising)
    assert len(control.paths) == 16
    assert {path.split(".")[0] for path in control.paths} == {"down_blocks", "mid_block", "up_blocks"}
    pairs = _official_width_sorted_pairs(reference, denoising)
    assert len(pairs) == 16 and all(reader == writer for reader, writer in pairs)
    assert sorted(f"{reader}.attn1" for reader, _ in pairs) == sorted(self_attention_paths(denoising))


# -- ReferenceNet, checkpoints, backbone --------------------------------------------------------------------

def test_reference_net_from_sd_unet_ignores_output_head_with_a_logged_list(tmp_path, caplog):
    torch.manual_seed(0)
    unet2d = UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
    unet2d.save_pretrained(tmp_path / "sd" / "unet")
    with caplog.at_level(logging.INFO, logger="aniportrait.models.reference_unet"):
        reference = ReferenceNet.from_pretrained(tmp_path / "sd", subfolder="unet").eval()
    assert "ignored 4 weights" in caplog.text and "conv_out.weight" in caplog.text
    assert not [key for key in reference.state_dict() if key.startswith(("conv_out", "conv_norm_out"))]
    last_up = []
    unet2d.up_blocks[-1].register_forward_hook(lambda _m, _i, out: last_up.append(out))
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 1, 32)
    with torch.no_grad():
        unet2d(sample, 3, context)
        torch.testing.assert_close(reference(sample, 3, context).sample, last_up[0])
    reference.save_pretrained(tmp_path / "reference_net")
    reloaded = ReferenceNet.from_pretrained(tmp_path / "reference_net")
    assert all(torch.equal(value, reloaded.state_dict()[key]) for key, value in reference.state_dict().items())
    weights = load_file(str(tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors"))
    del weights["conv_in.bias"]
    save_file(weights, str(tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(AniPortraitError, match=r"missing keys: \['conv_in.bias'\]"):
        ReferenceNet.from_pretrained(tmp_path / "sd", subfolder="unet")


def test_load_state_dict_checked_lists_problems_and_leaves_module_unchanged(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    before = copy.deepcopy(module.state_dict())
    state = {"0.weight": torch.zeros(3, 2), "0.bias": torch.zeros(3), "1.weight": torch.zeros(1, 4), "extra": torch.ones(1)}
    with pytest.raises(AniPortraitError) as error:
        load_state_dict_checked(module, state, "toy")
    message = str(error.value)
    assert "toy" in message and "1.weight (1, 4) vs (1, 3)" in message and "1.bias" in message and "extra" in message
    assert all(torch.equal(before[key], module.state_dict()[key]) for key in before)
    state["1.weight"] = torch.zeros(1, 3)
    report = load_state_dict_checked(module, state, "toy", allow_missing=("1.",), allow_unexpected=("extra",))
    assert report.missing == ("1.bias",) and report.unexpected == ("extra",)
    assert torch.equal(module[0].weight, torch.zeros(3, 2))
    with pytest.raises(AniPortraitError, match="does not exist"):
        read_checkpoint(tmp_path / "absent.pth")


@pytest.mark.parametrize("kind", ["tiny", "small"])
def test_random_backbones_start_both_unets_from_one_2d_unet(kind):
    """As both official UNets start from SD-1.5: the same 2-D weights, the stage-2 motion modules aside."""
    for use_motion_module in (False, True):
        models = build_video_models({"kind": kind, "seed": 3}, use_motion_module=use_motion_module)
        reference = models.reference_unet.state_dict()
        denoising = models.denoising_unet.state_dict()
        assert set(reference) <= set(denoising)
        for key, value in reference.items():
            assert torch.equal(value, denoising[key]), key
        extra = {key.split(".")[0] for key in set(denoising) - set(reference) if ".motion_modules." not in key}
        assert extra == {"conv_norm_out", "conv_out"}  # the output head the ReferenceNet has no use for
    other = build_video_models({"kind": kind, "seed": 4}, use_motion_module=False)
    assert not torch.equal(other.reference_unet.conv_in.weight, models.reference_unet.conv_in.weight)


def test_tiny_backbone_runs_stage_b_end_to_end():
    models = build_video_models({"kind": "tiny", "seed": 0})
    again = build_video_models({"kind": "tiny", "seed": 0}, use_motion_module=False)
    assert torch.equal(models.reference_unet.conv_in.weight, again.reference_unet.conv_in.weight)
    assert not any(".motion_modules." in key for key in again.denoising_unet.state_dict())
    control = ReferenceAttentionControl(models.reference_unet, models.denoising_unet)
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    pose_images = scale_pose_images(torch.randint(0, 256, (1, 3, 2, 64, 64), dtype=torch.uint8), "unit")
    with torch.no_grad():
        ref_latents = models.vae.encode(images).latent_dist.mean * models.vae.config.scaling_factor
        clip_pixels = models.clip_image_processor(images=[torch.rand(3, 64, 64)], return_tensors="pt",
                                                  do_rescale=False).pixel_values
        context = models.image_encoder(clip_pixels).image_embeds.unsqueeze(1)  # (b, 1, 32)
        control.write()
        models.reference_unet(ref_latents, 0, context)
        control.read(num_frames=2)
        features = models.pose_guider.eval()(pose_images, scale_pose_images(torch.zeros(1, 3, 64, 64), "unit"))
        out = models.denoising_unet(torch.randn(1, 4, 2, 8, 8), 500, context, pose_cond_fea=features).sample
    assert ref_latents.shape == (1, 4, 8, 8) and out.shape == (1, 4, 2, 8, 8) and torch.isfinite(out).all()


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_sd15_backbone_errors_name_the_config_key(tmp_path):
    with pytest.raises(AniPortraitError, match=r"backbone\.base_model is not set"):
        build_video_models({"kind": "sd15"})
    with pytest.raises(AniPortraitError, match=r"backbone\.base_model='.*nowhere'.*unet/config\.json"):
        build_video_models({"kind": "sd15", "base_model": str(tmp_path / "nowhere")})
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    with pytest.raises(AniPortraitError, match=r"backbone\.base_model=.*lacks"):
        build_video_models({"kind": "sd15", "base_model": str(tmp_path / "sd"), "image_encoder": str(tmp_path)})
    with pytest.raises(AniPortraitError, match=r"backbone\.base_model: could not load .*local_files_only"):
        build_video_models({"kind": "sd15", "base_model": "nobody-has/this-model-xyz", "vae": "nobody-has/vae-xyz",
                            "image_encoder": "nobody-has/clip-xyz", "local_files_only": True})
    with pytest.raises(AniPortraitError, match=r"backbone\.kind"):
        build_video_models({"kind": "sdxl"})


def test_sd15_backbone_loads_local_directories(tmp_path):
    """The sd15 path on directories laid out like SD-1.5 / sd-vae-ft-mse / sd-image-variations (tiny weights)."""
    tiny = build_video_models({"kind": "tiny", "seed": 1})
    torch.manual_seed(1)
    UNet2DConditionModel(**TINY_UNET_CONFIG).save_pretrained(tmp_path / "sd" / "unet")
    tiny.vae.save_pretrained(tmp_path / "sd" / "vae")
    tiny.image_encoder.save_pretrained(tmp_path / "variations" / "image_encoder")
    torch.save(tiny.denoising_unet.motion_module_state_dict(), tmp_path / "motion_module.pth")
    models = build_video_models(
        {"kind": "sd15", "base_model": str(tmp_path / "sd"), "image_encoder": str(tmp_path / "variations"),
         "motion_module": str(tmp_path / "motion_module.pth"), "local_files_only": True},
        pose_guider_kwargs={"attention_num_heads": 2, "attention_head_dim": 16},
    )
    unet2d = UNet2DConditionModel.from_pretrained(tmp_path / "sd", subfolder="unet")
    assert torch.equal(models.reference_unet.conv_in.weight, unet2d.conv_in.weight)
    assert torch.equal(models.denoising_unet.conv_out.weight, unet2d.conv_out.weight)
    mm_key = "mid_block.motion_modules.0.temporal_transformer.proj_in.weight"
    assert torch.equal(models.denoising_unet.state_dict()[mm_key], tiny.denoising_unet.state_dict()[mm_key])
    assert torch.equal(models.vae.encoder.conv_in.weight, tiny.vae.encoder.conv_in.weight)
    assert models.pose_guider.config.noise_latent_channels == 32
