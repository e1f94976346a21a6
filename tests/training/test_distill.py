"""Stage 3, latent consistency distillation (aniportrait/training/distill.py), on the tiny backbone: the schedule
maths against diffusers' DDIM and LCM schedulers, what trains, a loss that falls, the student reading the teacher's
reference bank, the bundle's distilled sampler, and the errors for a missing teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler
from test_video_training import FAST, TINY, datamodule, random_stage2, randomize, source, trainer  # noqa: F401 (source: a fixture)

from aniportrait.api import AniPortrait
from aniportrait.bundle import Bundle
from aniportrait.errors import AniPortraitError
from aniportrait.pipelines.pose2video import Pose2VideoPipeline
from aniportrait.training.distill import ConsistencySchedule, VideoDistillModule, lcm_scheduler_config
from aniportrait.training.video import OFFICIAL_TRAIN_NOISE_SCHEDULER, VideoStage2Module

TRAIN_SCHEDULE = {key: value for key, value in OFFICIAL_TRAIN_NOISE_SCHEDULER.items() if key != "_target_"}


@pytest.fixture(scope="module")
def teacher() -> VideoStage2Module:
    """A stage-2 model with random (not identity) motion modules, as a trained teacher would have."""
    return random_stage2(stage1_seed=1, unet_seed=2, frames=4)


def student_of(teacher: VideoStage2Module, **settings) -> VideoDistillModule:
    module = VideoDistillModule(TINY, gradient_checkpointing=False, **{**FAST, **settings})
    module.inherit({"video_stage2": teacher})
    return module


def test_the_schedule_is_diffusers_ddim_and_lcm_maths():
    ddim = DDIMScheduler(**TRAIN_SCHEDULE)
    schedule = ConsistencySchedule(ddim.alphas_cumprod, 50, "v_prediction")
    lcm_config = lcm_scheduler_config(TRAIN_SCHEDULE, 50, 10.0)
    lcm = LCMScheduler(**{key: value for key, value in lcm_config.items() if key != "_target_"})
    lcm.set_timesteps(50)
    assert sorted(lcm.timesteps.tolist()) == schedule.ddim_timesteps.tolist()  # the grid the student samples on

    sample = torch.randn(2, 4, 3, 8, 8, dtype=torch.float64)
    for timestep in (0, 19, 499, 999):
        c_skip, c_out = schedule.boundary(torch.tensor([timestep] * 2), sample)
        expected = lcm.get_scalings_for_boundary_condition_discrete(timestep)
        assert float(c_skip[0]) == pytest.approx(float(expected[0])) and float(c_out[0]) == pytest.approx(float(expected[1]))
    output = torch.randn_like(sample)
    at_zero = schedule.consistency(output, sample, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(at_zero, sample)  # the boundary condition: f(x, 0) = x

    noise, t = torch.randn_like(sample), torch.tensor([519, 519])
    torch.testing.assert_close(schedule.add_noise(sample, noise, t), ddim.add_noise(sample, noise, t))
    ddim.set_timesteps(50)  # one DDIM step spans 1000 / 50 timesteps, as the solver's
    expected = ddim.step(output, 519, sample, eta=0.0).prev_sample
    step = schedule.ddim_step(*schedule.x0_and_noise(output, sample, t), t - schedule.skip)
    torch.testing.assert_close(step, expected)
    start, end = schedule.interval(torch.tensor([0, 49]))
    assert start.tolist() == [19, 999] and end.tolist() == [0, 979]


def test_the_student_starts_as_the_teacher_and_reads_its_reference_bank(teacher):
    module = student_of(teacher)
    student, original = module.student_unet.state_dict(), teacher.denoising_unet.state_dict()
    assert student.keys() == original.keys() and all(torch.equal(student[key], original[key]) for key in original)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 3, 8, 8, generator=generator)
    reference = torch.randn(1, 4, 8, 8, generator=generator)
    embeds = torch.randn(1, 1, module.denoising_unet.config.cross_attention_dim, generator=generator)
    t = torch.tensor([500])
    with torch.no_grad():
        module.reference_control.write()
        module.reference_unet(reference, torch.zeros_like(t), embeds)
        module.reference_control.read(num_frames=3)
        with_bank = [unet(latents, t, embeds).sample for unet in (module.denoising_unet, module.student_unet)]
        module.reference_control.clear()
        without_bank = module.student_unet(latents, t, embeds).sample
    torch.testing.assert_close(with_bank[1], with_bank[0])
    assert (with_bank[1] - without_bank).abs().max() > 1e-3  # the student really attends to the reference


def test_distillation_trains_only_the_student_and_its_consistency_loss_falls(teacher, source, tmp_path):  # noqa: F811
    # the target is the student itself (no EMA): the objective is then a fixed rule, and its value on fixed
    # validation noise and timesteps must fall; with the EMA target it may rise early (the target lags the student)
    module = student_of(teacher, optimizer={"_target_": "torch.optim.AdamW", "lr": 1e-4},
                        distillation={"target_ema_decay": None, "validation_teacher_steps": 5})
    assert module.target_unet is None
    frozen = {name: tensor.clone() for name, tensor in module.state_dict().items()
              if not name.startswith("student_unet.")}
    trainable = {name for name, param in module.named_parameters() if param.requires_grad}
    assert trainable and all(name.startswith("student_unet.") for name in trainable)
    student_before = {name: param.detach().clone() for name, param in module.student_unet.named_parameters()}

    data = datamodule(source, n_sample_frames=4, sample_rate=[1], batch_size=2, eval_batch_size=2)
    fit = trainer(tmp_path, max_steps=24, limit_val_batches=2)
    before = fit.validate(module, datamodule=data, verbose=False)[0]
    fit.fit(module, datamodule=data)
    after = fit.validate(module, datamodule=data, verbose=False)[0]
    assert after["val/loss"] < 0.85 * before["val/loss"], (before, after)
    assert np.isfinite(after["val/teacher_gap"]) and after["val/teacher_gap"] > 0

    state = module.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in frozen.items())  # teacher, ReferenceNet, PoseGuider
    moved = [name for name, param in module.student_unet.named_parameters()
             if not torch.equal(param, student_before[name])]
    assert len(moved) > 50


def test_the_target_network_follows_the_student_by_its_decay(teacher, source, tmp_path):  # noqa: F811
    module = student_of(teacher)  # target_ema_decay 0.95
    start = module.target_unet.conv_in.weight.detach().clone()
    trainer(tmp_path, max_steps=1).fit(module, datamodule=datamodule(source, n_sample_frames=4, sample_rate=[1],
                                                                      batch_size=1))
    expected = 0.95 * start + 0.05 * module.student_unet.conv_in.weight.detach()
    assert not torch.equal(module.student_unet.conv_in.weight, start)  # the optimizer step moved the student
    torch.testing.assert_close(module.target_unet.conv_in.weight.detach(), expected)
    target_before = {name: param.detach().clone() for name, param in module.target_unet.named_parameters()}
    randomize(module.student_unet, seed=7)
    module.update_target()  # what every optimizer step ends with
    for name, param in module.target_unet.named_parameters():
        expected = 0.95 * target_before[name] + 0.05 * dict(module.student_unet.named_parameters())[name]
        torch.testing.assert_close(param, expected)


def test_motion_modules_only(teacher):
    module = student_of(teacher, distillation={"trainable": "motion_modules"})
    trainable = [name for name, param in module.named_parameters() if param.requires_grad]
    assert trainable and all(name.startswith("student_unet.") and ".motion_modules." in name for name in trainable)


def test_the_bundle_samples_with_the_student_on_request(teacher, tmp_path):
    module = student_of(teacher)
    randomize(module.student_unet, seed=3)  # a trained student differs from its teacher
    bundle = Bundle.open(module.export(tmp_path / "bundle"))
    assert {"distilled_denoising_unet", "distilled_motion_module", "denoising_unet", "motion_module"} <= set(
        bundle.components)
    distilled = bundle.settings["video"]["distilled"]
    assert distilled["scheduler"]["_target_"] == "diffusers.LCMScheduler" and distilled["guidance_scale"] == 1.0
    assert bundle.settings["video"]["num_inference_steps"] == 25  # the teacher stays the default sampler

    pipeline = Pose2VideoPipeline.from_bundle(bundle, distilled=True)
    assert isinstance(pipeline.scheduler, LCMScheduler)
    assert pipeline.video_settings["num_inference_steps"] == 4 and pipeline.video_settings["guidance_scale"] == 1.0
    assert pipeline.video_settings["deep_cache_interval"] == 1  # the student's few steps: the whole UNet at each
    loaded, original = pipeline.denoising_unet.state_dict(), module.student_unet.state_dict()
    assert loaded.keys() == original.keys() and all(torch.equal(loaded[key], original[key]) for key in original)
    frames = pipeline(np.zeros((64, 64, 3), np.uint8), np.zeros((3, 64, 64, 3), np.uint8), num_inference_steps=2,
                      guidance_scale=1.0, progress=False)
    assert frames.shape == (3, 64, 64, 3)
    teacher_pipeline = Pose2VideoPipeline.from_bundle(bundle)
    assert torch.equal(teacher_pipeline.denoising_unet.conv_in.weight, teacher.denoising_unet.conv_in.weight)
    assert isinstance(AniPortrait(bundle, device="cpu", fast=True).pipeline.scheduler, LCMScheduler)

    plain = Bundle.open(teacher.export(tmp_path / "teacher"))
    with pytest.raises(AniPortraitError, match="no distilled student .*model=video_distill"):
        Pose2VideoPipeline.from_bundle(plain, distilled=True)


def test_a_missing_or_wrong_teacher_is_a_clear_error(tmp_path):
    module = VideoDistillModule(TINY, gradient_checkpointing=False)
    module.setup("fit")
    with pytest.raises(AniPortraitError, match="model.teacher is not set"):
        module.on_fit_start()
    (tmp_path / "folder").mkdir()
    with pytest.raises(AniPortraitError, match="model.teacher=.*not a bundle folder"):
        VideoDistillModule(TINY, teacher=str(tmp_path / "folder")).setup("fit")
    with pytest.raises(AniPortraitError, match="model.distillation.loss"):
        VideoDistillModule(TINY, distillation={"loss": "l1"})
    with pytest.raises(AniPortraitError, match="model.distillation has unknown keys"):
        VideoDistillModule(TINY, distillation={"steps": 4})


def test_resume_from_a_checkpoint_repeats_the_uninterrupted_losses(teacher, source, tmp_path):  # noqa: F811
    import pytorch_lightning as pl
    from test_video_training import LossRecorder

    bundle = teacher.export(tmp_path / "teacher")  # model.teacher as a user gives it

    def module() -> VideoDistillModule:
        return VideoDistillModule(TINY, teacher=str(bundle), gradient_checkpointing=False, seed=3,
                                  distillation={"validation_teacher_steps": 2}, **FAST)

    data = lambda: datamodule(source, n_sample_frames=4, sample_rate=[1], batch_size=1)  # noqa: E731
    uninterrupted = LossRecorder()
    trainer(tmp_path / "a", max_steps=4, callbacks=[uninterrupted]).fit(module(), datamodule=data())
    first = LossRecorder()
    saving = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=2, save_top_k=-1,
                                          filename="step{step}")
    trainer(tmp_path / "b", max_steps=2, callbacks=[first, saving], enable_checkpointing=True).fit(
        module(), datamodule=data())
    resumed, continued = LossRecorder(), module()
    trainer(tmp_path / "c", max_steps=4, callbacks=[resumed]).fit(continued, datamodule=data(),
                                                                  ckpt_path=next((tmp_path / "b").glob("*.ckpt")))
    assert first.losses == uninterrupted.losses[:2]
    assert resumed.losses == uninterrupted.losses[2:]  # the student, its target and the optimizer came back
