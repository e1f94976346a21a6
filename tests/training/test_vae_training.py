"""model=vae: the VAE of a random-init backbone is fitted on frames, then used frozen by stage B and inference."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from aniportrait.bundle import Bundle, load_vae
from aniportrait.data.sources import ClipSource
from aniportrait.data.video_frames import VideoFrameDataModule
from aniportrait.errors import AniPortraitError
from aniportrait.pipelines.pose2video import Pose2VideoPipeline
from aniportrait.training.vae import VAEModule
from aniportrait.training.video import VideoStage1Module

TINY = {"kind": "tiny", "seed": 0}
TINY_CLIP = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}


def frames_datamodule(tiny_dataset: Path, **settings) -> VideoFrameDataModule:
    return VideoFrameDataModule(ClipSource(str(tiny_dataset)), width=64, height=64, clip_image_processor=TINY_CLIP,
                                num_workers=0, batch_size=8, eval_batch_size=8, samples_per_epoch=4000,
                                conditioning=False, frame_cache_clips=16, **settings)


@pytest.fixture(scope="module")
def fitted(tiny_dataset, tmp_path_factory) -> tuple[VAEModule, float, float, Path]:
    """A tiny VAE fitted for 60 steps; its held-out (val clips) reconstruction PSNR before and after; its bundle."""
    torch.manual_seed(0)
    module = VAEModule(TINY, optimizer={"_target_": "torch.optim.AdamW", "lr": 2e-3, "betas": [0.5, 0.9]}, seed=0)
    data = frames_datamodule(tiny_dataset)
    trainer = pl.Trainer(accelerator="cpu", max_steps=60, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         val_check_interval=60, default_root_dir=str(tmp_path_factory.mktemp("vae")))
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["val/psnr"]
    trainer.fit(module, datamodule=data)
    after = float(trainer.callback_metrics["val/psnr"])
    bundle = module.export(tmp_path_factory.mktemp("vae_bundle") / "bundle")
    return module, before, after, bundle


def test_fitting_lowers_the_reconstruction_error_of_held_out_frames(fitted):
    _, before, after, _ = fitted
    assert after > before + 3.0, (before, after)  # dB on frames of clips it never saw


def test_the_scaling_factor_makes_latents_unit_variance(fitted, tiny_dataset):
    module, _, _, _ = fitted
    vae = module.trained_vae()
    assert vae.config.scaling_factor == pytest.approx(module.scaling_factor())
    data = frames_datamodule(tiny_dataset)
    data.setup()
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        latents = vae.encode(batch["pixel_values"].flatten(0, 1)).latent_dist.sample() * vae.config.scaling_factor
    assert 0.6 < float(latents.std()) < 1.6


def test_stage_b_and_inference_use_the_exported_vae_frozen(fitted, tmp_path):
    module, _, _, bundle_path = fitted
    bundle = Bundle.open(bundle_path)
    assert bundle.has("vae") and bundle.settings["vae"]["scaling_factor"] == pytest.approx(module.scaling_factor())
    loaded = load_vae(bundle_path, "backbone.video.vae")
    expected = {key: value.float() for key, value in module.vae.state_dict().items()}
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in expected.items())

    stage1 = VideoStage1Module({**TINY, "vae": str(bundle_path), "require_trained_vae": True})
    assert stage1.vae_trained
    assert all(torch.equal(stage1.frozen.vae.state_dict()[key], value) for key, value in expected.items())
    assert not any(param.requires_grad for param in stage1.frozen.vae.parameters())
    stage_b = Path(stage1.export(tmp_path / "stage_b"))
    pipeline = Pose2VideoPipeline.from_bundle(stage_b)
    assert all(torch.equal(pipeline.vae.state_dict()[key], value) for key, value in expected.items())
    assert pipeline.vae.config.scaling_factor == pytest.approx(module.scaling_factor())


def test_a_multi_stage_run_hands_the_vae_over(fitted):
    module, _, _, _ = fitted
    stage1 = VideoStage1Module(TINY)
    assert not stage1.vae_trained
    stage1.inherit({"vae": module})
    assert stage1.vae_trained
    assert torch.equal(next(iter(stage1.frozen.vae.state_dict().values())),
                       next(iter(module.vae.state_dict().values())).float())


def test_a_backbone_without_a_trained_vae_refuses_stage_b(tiny_dataset, tmp_path):
    module = VideoStage1Module({**TINY, "require_trained_vae": True})
    data = VideoFrameDataModule(ClipSource(str(tiny_dataset)), width=64, height=64, clip_image_processor=TINY_CLIP,
                                num_workers=0, samples_per_epoch=8)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=str(tmp_path))
    with pytest.raises(AniPortraitError, match="backbone.video.vae is not set"):
        trainer.fit(module, datamodule=data)


def test_pretrained_backbones_bring_their_own_vae():
    with pytest.raises(AniPortraitError, match="random-init backbone"):
        VAEModule({"kind": "sd15", "base_model": "x/y"})


def test_patch_training_fits_random_patches_and_still_lowers_whole_frame_error(tiny_dataset, tmp_path):
    """train_patch_size: each training frame is cut to a random patch (seeded); validation still sees whole frames."""
    module = VAEModule(TINY, optimizer={"_target_": "torch.optim.AdamW", "lr": 2e-3, "betas": [0.5, 0.9]}, seed=0,
                       train_patch_size=32)
    frames = torch.arange(4 * 3 * 64 * 64, dtype=torch.float32).reshape(4, 3, 64, 64)
    patches = module._patches(frames)
    assert patches.shape == (4, 3, 32, 32)
    corners = [(int(p[0, 0, 0]) // 64 % 64, int(p[0, 0, 0]) % 64) for p in patches]  # (top, left) of each patch
    for frame, patch, (top, left) in zip(frames, patches, corners):
        torch.testing.assert_close(patch, frame[:, top : top + 32, left : left + 32])
    assert len(set(corners)) > 1  # one place per frame
    torch.testing.assert_close(module._patches(frames), patches)  # seeded by the step
    assert VAEModule(TINY, seed=0)._patches(frames) is frames  # null: whole frames

    data = frames_datamodule(tiny_dataset)
    trainer = pl.Trainer(accelerator="cpu", max_steps=60, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         val_check_interval=60, default_root_dir=str(tmp_path))
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["val/psnr"]
    trainer.fit(module, datamodule=data)
    assert float(trainer.callback_metrics["val/psnr"]) > before + 3.0  # whole held-out frames


@pytest.mark.parametrize("size", [0, 12, 128])
def test_bad_patch_sizes_are_refused(size):
    if size == 128:  # taller than the frames but narrower: refused when training starts, naming the key
        with pytest.raises(AniPortraitError, match="train_patch_size=128"):
            VAEModule(TINY, seed=0, train_patch_size=128)._patches(torch.zeros(2, 3, 64, 192))
        return
    with pytest.raises(AniPortraitError, match="train_patch_size"):
        VAEModule(TINY, seed=0, train_patch_size=size)


def test_channels_last_vae_computes_the_same_loss():
    frames = torch.rand(2, 3, 64, 64) * 2 - 1
    plain, fast = VAEModule(TINY, seed=0), VAEModule(TINY, seed=0, channels_last=True)
    assert fast.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    loss_plain, _ = plain._loss(frames, stream=0)
    loss_fast, _ = fast._loss(frames.contiguous(memory_format=torch.channels_last), stream=0)
    torch.testing.assert_close(loss_fast, loss_plain, rtol=1e-4, atol=1e-5)
