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
