"""Stage-B training on the tiny backbone: learning, what trains, resume, stage-1 sources, errors, export."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from aniportrait.bundle import Bundle
from aniportrait.data.sources import ClipSource
from aniportrait.data.video_frames import VideoFrameDataModule
from aniportrait.errors import AniPortraitError
from aniportrait.pipelines.pose2video import Pose2VideoPipeline
from aniportrait.training.video import VideoStage1Module, VideoStage2Module

TINY = {"kind": "tiny", "seed": 0}
TINY_CLIP = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
FAST = {"optimizer": {"_target_": "torch.optim.AdamW", "lr": 1.0e-3}, "eight_bit_adam": False}


@pytest.fixture(scope="module")
def source(tiny_dataset: Path) -> ClipSource:
    """The session's tiny synthetic dataset (tests/conftest.py): 3 identities x 3 clips of 1.5 s at 64 px."""
    return ClipSource(str(tiny_dataset))


def datamodule(source: ClipSource, **settings) -> VideoFrameDataModule:
    return VideoFrameDataModule(source, **{"width": 64, "height": 64, "clip_image_processor": TINY_CLIP,
                                           "num_workers": 0, "batch_size": 2, "eval_batch_size": 3,
                                           "samples_per_epoch": 400, **settings})


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def trainer(tmp_path: Path, max_steps: int, callbacks=(), **kwargs) -> pl.Trainer:
    settings = {"accelerator": "cpu", "max_steps": max_steps, "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                "limit_val_batches": 0, "default_root_dir": str(tmp_path), **kwargs}
    return pl.Trainer(callbacks=list(callbacks), **settings)


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def test_stage1_loss_falls_and_validation_writes_sample_videos(source, tmp_path):
    videos = {"_target_": "aniportrait.training.video.ValidationVideos", "out_dir": str(tmp_path / "samples"),
              "num_videos": 1, "num_frames": 3, "num_inference_steps": 2}
    module = VideoStage1Module(TINY, callbacks={"videos": videos}, seed=0, **FAST)
    data = datamodule(source, batch_size=4)
    fit = trainer(tmp_path, max_steps=30, limit_val_batches=None, val_check_interval=30)
    before = fit.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    fit.fit(module, datamodule=data)
    after = fit.callback_metrics["val/loss"].item()
    assert after < 0.7 * before, (before, after)
    written = sorted((tmp_path / "samples").glob("step_000030_0_*.mp4"))
    assert len(written) == 1 and written[0].stat().st_size > 0


def test_stage2_changes_only_the_motion_modules(source, tmp_path):
    stage1 = VideoStage1Module(TINY)
    randomize(stage1, seed=1)
    module = VideoStage2Module(TINY, **FAST)
    module.load_stage1_from_module(stage1)
    before = {key: value.clone() for key, value in module.state_dict().items()}
    vae_before = {key: value.clone() for key, value in module.frozen.vae.state_dict().items()}
    trainable = {name for name, param in module.named_parameters() if param.requires_grad}
    assert trainable and all(".motion_modules." in name for name in trainable)

    trainer(tmp_path, max_steps=4).fit(module, datamodule=datamodule(source, n_sample_frames=4, sample_rate=[1, 2],
                                                                      batch_size=1))
    after = module.state_dict()
    motion = [key for key in after if ".motion_modules." in key]
    others = [key for key in after if ".motion_modules." not in key]
    assert len(others) > 100 and all(torch.equal(before[key], after[key]) for key in others)  # BatchNorm buffers too
    assert sum(not torch.equal(before[key], after[key]) for key in motion) > 10
    assert all(torch.equal(vae_before[key], value) for key, value in module.frozen.vae.state_dict().items())
    assert not module.pose_guider.training and not module.reference_unet.training


def test_resume_from_a_checkpoint_repeats_the_uninterrupted_losses(source, tmp_path):
    def module() -> VideoStage1Module:
        return VideoStage1Module(TINY, seed=3, ema={"decay": 0.9}, scheduler={
            "_target_": "aniportrait.training.schedules.warmup_constant", "warmup_steps": 3}, **FAST)

    uninterrupted = LossRecorder()
    trainer(tmp_path / "a", max_steps=5, callbacks=[uninterrupted]).fit(module(), datamodule=datamodule(source))

    first = LossRecorder()
    saving = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=3, save_top_k=-1,
                                          filename="step{step}")
    trainer(tmp_path / "b", max_steps=3, callbacks=[first, saving], enable_checkpointing=True).fit(
        module(), datamodule=datamodule(source))
    checkpoint = next((tmp_path / "b").glob("*.ckpt"))
    resumed = LossRecorder()
    continued = module()
    trainer(tmp_path / "c", max_steps=5, callbacks=[resumed]).fit(continued, datamodule=datamodule(source),
                                                                  ckpt_path=checkpoint)
    assert first.losses == uninterrupted.losses[:3]
    assert resumed.losses == uninterrupted.losses[3:]
    assert continued.ema is not None and continued.ema.shadow
    reference = module()
    trainer(tmp_path / "d", max_steps=5).fit(reference, datamodule=datamodule(source))
    assert all(torch.equal(continued.ema.shadow[name], tensor) for name, tensor in reference.ema.shadow.items())


def test_stage2_without_a_stage1_source_is_a_clear_error():
    module = VideoStage2Module(TINY)
    module.setup("fit")  # Lightning restores a resumed run's checkpoint after setup: the check waits for fit start
    with pytest.raises(AniPortraitError, match=r"model\.stage1 is not set: .*model\.stage1=PATH"):
        module.on_fit_start()
    resumed = VideoStage2Module(TINY)
    resumed.setup("fit")
    resumed.on_load_checkpoint({"aniportrait": {}})  # a stage-2 checkpoint holds the stage-1 weights
    resumed.on_fit_start()
    with pytest.raises(AniPortraitError, match=r"model\.stage1=.*nowhere: no such file or folder"):
        VideoStage2Module(TINY, stage1="/nowhere").setup("fit")


def test_stage2_takes_stage1_from_a_bundle_or_a_lightning_checkpoint(tmp_path):
    stage1 = VideoStage1Module(TINY)
    randomize(stage1, seed=2)
    bundle = stage1.export(tmp_path / "stage1")
    torch.save({"state_dict": stage1.state_dict(), "global_step": 7}, tmp_path / "stage1.ckpt")
    for source in (bundle, tmp_path / "stage1.ckpt"):
        module = VideoStage2Module(TINY, stage1=str(source))
        module.setup("fit")
        for name in ("reference_unet", "pose_guider"):
            expected = getattr(stage1, name).state_dict()
            assert all(torch.equal(value, expected[key]) for key, value in getattr(module, name).state_dict().items())
        expected = stage1.denoising_unet.state_dict()
        loaded = module.denoising_unet.state_dict()
        assert all(torch.equal(loaded[key], value) for key, value in expected.items())
    with pytest.raises(AniPortraitError, match=r"other\.ckpt has no denoising_unet weights \(keys denoising_unet\.\*\)"):
        torch.save({"state_dict": {"reference_unet.x": torch.zeros(1)}}, tmp_path / "other.ckpt")
        VideoStage2Module(TINY, stage1=str(tmp_path / "other.ckpt")).setup("fit")


def test_missing_base_model_path_names_the_config_key(tmp_path):
    with pytest.raises(AniPortraitError, match=r"backbone\.video\.base_model='.*nowhere': no such directory"):
        VideoStage1Module({"kind": "sd15", "base_model": str(tmp_path / "nowhere"), "image_encoder": str(tmp_path)})


def test_fine_tuning_source_of_another_architecture_lists_the_keys(tmp_path):
    other = VideoStage1Module(TINY)
    torch.save(other.reference_unet.state_dict(), tmp_path / "not_a_pose_guider.pth")
    module = VideoStage1Module(TINY, init={"pose_guider": str(tmp_path / "not_a_pose_guider.pth")})
    with pytest.raises(AniPortraitError, match=r"pose_guider .*does not fit PoseGuider: 184 missing keys: scale, conv_layers.*; 438 unexpected keys: conv_in\.weight"):
        module.setup("fit")


def random_stage2(stage1_seed: int, unet_seed: int, frames: int) -> VideoStage2Module:
    """A stage-2 model with random stage-1 weights and random (not identity) motion modules, as after training."""
    stage1 = VideoStage1Module(TINY)
    randomize(stage1, seed=stage1_seed)
    module = VideoStage2Module(TINY)
    module.load_stage1_from_module(stage1)
    randomize(module.denoising_unet, seed=unet_seed)
    module.data_settings = {"width": 64, "height": 64, "n_sample_frames": frames, "fps": 30.0, "pose_scaling": "unit"}
    return module


def test_export_round_trips_bit_exactly_and_builds_a_pipeline(tmp_path):
    module = random_stage2(stage1_seed=4, unet_seed=5, frames=16)
    bundle = Bundle.open(module.export(tmp_path / "bundle"))

    assert set(bundle.components) == {"reference_unet", "denoising_unet", "pose_guider", "motion_module"}
    assert not any(".motion_modules." in key for key in bundle.state_dict("denoising_unet"))
    assert all(".motion_modules." in key for key in bundle.state_dict("motion_module"))
    for name in ("reference_unet", "pose_guider"):
        loaded, original = bundle.load(name).state_dict(), getattr(module, name).state_dict()
        assert loaded.keys() == original.keys() and all(torch.equal(loaded[key], original[key]) for key in original)
    pipeline = Pose2VideoPipeline.from_bundle(bundle)
    loaded, original = pipeline.denoising_unet.state_dict(), module.denoising_unet.state_dict()
    assert loaded.keys() == original.keys() and all(torch.equal(loaded[key], original[key]) for key in original)
    assert pipeline.pose_scaling == "unit" and bundle.settings["video"]["stage"] == 2
    assert bundle.base_models["video"] == TINY
    frames = pipeline(np.zeros((64, 64, 3), np.uint8), np.zeros((2, 64, 64, 3), np.uint8), num_inference_steps=1,
                      progress=False)
    assert frames.shape == (2, 64, 64, 3)


def test_ema_weights_are_what_the_bundle_holds(source, tmp_path):
    module = VideoStage1Module(TINY, ema={"decay": 0.5}, **FAST)
    trainer(tmp_path, max_steps=2).fit(module, datamodule=datamodule(source))
    bundle = Bundle.open(module.export(tmp_path / "bundle"))
    exported = bundle.state_dict("pose_guider")
    shadow = {key.removeprefix("pose_guider."): value for key, value in module.ema.shadow.items()
              if key.startswith("pose_guider.")}
    assert shadow and all(torch.equal(exported[key], value) for key, value in shadow.items())
    raw = module.pose_guider.state_dict()
    assert any(not torch.equal(exported[key], raw[key]) for key in shadow)
    assert bundle.settings["video"]["weights"] == "ema"


def test_eight_bit_adam_is_an_explicit_choice(caplog):
    if __import__("importlib").util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(AniPortraitError, match="bitsandbytes is not installed"):
        VideoStage1Module(TINY, eight_bit_adam=True).configure_optimizers()
    with caplog.at_level(logging.WARNING, logger="aniportrait.training.video"):
        optimizer = VideoStage1Module(TINY, eight_bit_adam="auto").configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert "eight_bit_adam=auto: using torch.optim.AdamW, not 8-bit AdamW, because bitsandbytes is not installed" in caplog.text


def test_reference_dropout_trains_the_unconditional_branch_without_the_reference(source):
    data = datamodule(source)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    for ratio, reference_trains in ((1.0, False), (0.0, True)):
        module = VideoStage1Module(TINY, loss={"uncond_ratio": ratio})
        module.training_step(batch, 0).backward()
        module.on_train_batch_end(None, batch, 0)
        gradients = [param.grad for param in module.reference_unet.parameters() if param.requires_grad]
        assert any(grad is not None and grad.abs().sum() > 0 for grad in gradients) == reference_trains
        assert module.pose_guider.final_proj.weight.grad is not None  # the pose path trains either way
        assert not module.reference_control.bank


def test_video_configs_compose_and_build(source, tmp_path):
    import hydra
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[2] / "conf"
    overrides = ["~experiment", f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        for model, module_class in (("video_stage1", VideoStage1Module), ("video_stage2", VideoStage2Module)):
            cfg = compose(config_name="train", overrides=[f"model={model}", "backbone=tiny", *overrides])
            settings = OmegaConf.to_container(cfg.model, resolve=True)
            loader = settings.pop("loader")
            module = hydra.utils.instantiate(settings, _recursive_=False)
            assert type(module) is module_class and module.hparams.backbone["kind"] == "tiny"
            data = hydra.utils.instantiate(loader, source=source)
            assert data.frame_settings.width == 64 and data.clip_image_processor.crop_size["height"] == 32
            # a from-scratch backbone samples with the betas it trains with; sd15 keeps the official pair
            assert module.sampling["scheduler"]["beta_schedule"] == "scaled_linear"
            assert module.noise_scheduler.config.beta_schedule == "scaled_linear"
        sd15 = compose(config_name="train", overrides=["model=video_stage2", "backbone=sd15", *overrides])
        assert sd15.model.loader.width == 512 and sd15.model.backbone.kind == "sd15"
        assert sd15.model.sampling.scheduler.beta_schedule == "linear"
        assert OmegaConf.to_container(sd15.model.loader.clip_image_processor) == {}


def test_a_samples_randomness_does_not_depend_on_how_samples_are_batched(source):
    """What DDP relies on: two ranks holding halves of a batch compute what one process holding all of it does."""
    data = datamodule(source, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = VideoStage1Module(TINY, loss={"uncond_per_sample": True, "uncond_ratio": 0.5})
    module.pose_guider.eval()  # BatchNorm statistics are per batch (DDP: trainer.sync_batchnorm)
    halves = [{key: value[part] for key, value in batch.items()} for part in (slice(0, 2), slice(2, 4))]
    with torch.no_grad():
        whole = module._diffusion_loss(batch, stream=0, allow_uncond=True)
        split = torch.stack([module._diffusion_loss(half, stream=0, allow_uncond=True) for half in halves]).mean()
    torch.testing.assert_close(whole, split)


def test_stage1_under_ddp_must_expect_unused_parameters():
    """Reference-dropout steps skip the ReferenceNet: plain DDP would fail at the first one, hours in."""
    module = VideoStage1Module(TINY)
    module.trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp", logger=False)
    with pytest.raises(AniPortraitError, match="trainer.strategy=ddp_find_unused_parameters_true"):
        module.setup("fit")
    module.trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp_find_unused_parameters_true", logger=False)
    module.setup("fit")
