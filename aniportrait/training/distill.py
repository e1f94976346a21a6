"""Stage 3: step distillation of stage B (``model=video_distill``), latent consistency distillation.

A student with the stage-2 architecture learns to jump from any point of the teacher's sampling trajectory to its
end, so that it samples in 1-4 steps without classifier-free guidance. The method is latent consistency
distillation (LCM, Luo et al. 2023; applied to AnimateDiff-style video models by AnimateLCM, Wang et al. 2024),
chosen over adversarial / distribution-matching distillation (DMD2, AnimateDiff-Lightning) because it needs no
discriminator or second "fake score" network beside a teacher that already holds a ReferenceNet, a PoseGuider and a
3-D UNet, trains stably at small batch sizes, and samples with diffusers' ``LCMScheduler`` unchanged; the price is
somewhat softer 1-2 step samples than adversarial methods give, at 4 steps the gap is small in both papers.

One step (``_distillation_loss``), with the solver's k = 1000 / ``num_ddim_timesteps`` skip::

    latents, reference bank, pose features, CLIP  as stage 2 (the ReferenceNet runs once; teacher, student and
                                                    target all read its bank)
    t = ddim_timesteps[n], s = max(t - k, 0)      n ~ U{0 .. N-1} per sample
    x_t      = add_noise(latents, noise, t)
    student  = c_skip(t) x_t + c_out(t) x0(student(x_t, t))
    teacher  = CFG with guidance w on [uncond; cond] (uncond: zero CLIP, no reference tokens, as sampling does)
    x_s      = DDIM(x0_w, eps_w; s)                 one teacher ODE step from t to s (no gradients)
    target   = c_skip(s) x_s + c_out(s) x0(target_net(x_s, s))   target_net: EMA of the student
    loss     = mean(sqrt((student - target)^2 + c^2) - c)         pseudo-Huber (c = huber_c), or MSE

The boundary scalings are diffusers' ``LCMScheduler`` ones (sigma_data 0.5, timestep x ``timestep_scaling``), so
c_skip(0) = 1 and c_out(0) = 0: at t = 0 the student is the identity. The schedule (betas, zero terminal SNR,
v-prediction) is the teacher's *training* noise schedule, the one that defines what its outputs mean at each
timestep, and the exported ``LCMScheduler`` uses the same betas.

Weights: ReferenceNet, PoseGuider and the teacher's UNet come from a stage-2 bundle (``model.teacher``) or the
previous stage of a ``model=all`` run; the student starts as a copy of the teacher's UNet (every parameter trains,
or only the motion modules with ``distillation.trainable=motion_modules``). The bundle keeps the teacher and adds
the student as ``distilled_denoising_unet`` + ``distilled_motion_module`` with its own sampling setting
(``settings.video.distilled``): ``Pose2VideoPipeline.from_bundle(distilled=True)`` / ``infer.py fast=true``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from aniportrait.bundle import BUNDLE_FILE, Bundle
from aniportrait.errors import AniPortraitError
from aniportrait.models.checkpointing import parse_checkpointing, set_gradient_checkpointing
from aniportrait.models.unet3d import UNet3DConditionModel
from aniportrait.training.video import VideoStage2Module, _settings

__all__ = ["ConsistencySchedule", "VideoDistillModule", "DISTILLATION_DEFAULTS", "lcm_scheduler_config"]

log = logging.getLogger(__name__)

DISTILLATION_DEFAULTS: dict[str, Any] = {
    "guidance_scale": 3.5,        # the teacher's CFG, folded into the student (the official sampling value)
    "num_ddim_timesteps": 50,     # solver grid: k = 1000 / 50 = 20 timesteps per teacher step (LCM's default)
    "target_ema_decay": 0.95,     # target network = EMA of the student (LCM); null: the student itself, no grad
    "loss": "huber",              # huber (pseudo-Huber, LCM) or mse
    "huber_c": 0.001,
    "timestep_scaling": 10.0,     # LCMScheduler's boundary-condition scaling
    "trainable": "all",           # all: the student's whole UNet; motion_modules: only its motion modules
    "num_inference_steps": 4,     # the exported sampling setting
    "validation_teacher_steps": 25,  # val/teacher_gap: the teacher's guided DDIM steps it is compared with
}


def lcm_scheduler_config(noise_scheduler: Mapping[str, Any], num_ddim_timesteps: int,
                         timestep_scaling: float) -> dict[str, Any]:
    """The ``LCMScheduler`` that samples the student: the distillation schedule's betas and prediction type."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
            "rescale_betas_zero_snr")
    return {"_target_": "diffusers.LCMScheduler", **{key: noise_scheduler[key] for key in keys if key in noise_scheduler},
            "original_inference_steps": int(num_ddim_timesteps), "timestep_scaling": float(timestep_scaling),
            "clip_sample": False}


class ConsistencySchedule:
    """The discrete maths of latent consistency distillation on one noise schedule (``alphas_cumprod``)."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_ddim_timesteps: int, prediction_type: str,
                 timestep_scaling: float = 10.0, sigma_data: float = 0.5):
        steps = len(alphas_cumprod)
        if not 1 <= num_ddim_timesteps <= steps:
            raise AniPortraitError(f"model.distillation.num_ddim_timesteps={num_ddim_timesteps}: give 1 to {steps}")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise AniPortraitError(f"distillation supports epsilon and v_prediction teachers, not {prediction_type!r}")
        self.alphas_cumprod = alphas_cumprod.double()
        self.skip = steps // num_ddim_timesteps  # k
        self.ddim_timesteps = torch.arange(1, num_ddim_timesteps + 1) * self.skip - 1  # (N,) as LCMScheduler's grid
        self.prediction_type = prediction_type
        self.timestep_scaling, self.sigma_data = float(timestep_scaling), float(sigma_data)

    def _coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t), shaped to broadcast over ``like`` (b, ...)."""
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps].to(like.dtype)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return alpha_bar.sqrt().view(shape), (1 - alpha_bar).sqrt().view(shape)

    def interval(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid indices (b,) -> (start t, end s = max(t - k, 0))."""
        start = self.ddim_timesteps[indices.cpu()]
        return start, (start - self.skip).clamp(min=0)

    def boundary(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c_skip(t), c_out(t) (LCMScheduler's scalings), shaped to broadcast over ``like``."""
        scaled = timesteps.to(like.dtype) * self.timestep_scaling
        c_skip = self.sigma_data**2 / (scaled**2 + self.sigma_data**2)
        c_out = scaled / (scaled**2 + self.sigma_data**2).sqrt()
        shape = (-1,) + (1,) * (like.dim() - 1)
        return c_skip.view(shape), c_out.view(shape)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._coefficients(timesteps, latents)
        return alpha * latents + sigma * noise

    def x0_and_noise(self, output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """A model output at ``timesteps`` -> (predicted clean latents, predicted noise)."""
        alpha, sigma = self._coefficients(timesteps, sample)
        if self.prediction_type == "v_prediction":
            return alpha * sample - sigma * output, alpha * output + sigma * sample
        return (sample - sigma * output) / alpha.clamp(min=1e-8), output

    def consistency(self, output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The consistency function f(x_t, t) = c_skip x_t + c_out x0."""
        c_skip, c_out = self.boundary(timesteps, sample)
        return c_skip * sample + c_out * self.x0_and_noise(output, sample, timesteps)[0]

    def ddim_step(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM: the point at ``timesteps`` of the trajectory through (x0, noise)."""
        alpha, sigma = self._coefficients(timesteps, x0)
        return alpha * x0 + sigma * noise


class VideoDistillModule(VideoStage2Module):
    """Stage 3 (see the module docstring; every argument is a ``model.*`` key of conf/model/video_distill.yaml).

    teacher: a stage-2 bundle folder (reference_unet, denoising_unet, pose_guider, motion_module); not needed in a
    ``model=all`` run, which hands over its stage 2. distillation: :data:`DISTILLATION_DEFAULTS` overrides.
    """

    def __init__(self, backbone: Mapping[str, Any], teacher: str | None = None,
                 distillation: Mapping[str, Any] | None = None, **stage2: Any):
        super().__init__(backbone, **stage2)  # stage 2's architecture (motion modules), settings and loaders
        self.save_hyperparameters({**dict(self.hparams), "teacher": teacher, "distillation": dict(distillation or {})})
        self.distillation = _settings("distillation", distillation, DISTILLATION_DEFAULTS)
        if self.distillation["loss"] not in ("huber", "mse"):
            raise AniPortraitError(f"model.distillation.loss={self.distillation['loss']!r}: expected huber or mse")
        if self.distillation["trainable"] not in ("all", "motion_modules"):
            raise AniPortraitError(f"model.distillation.trainable={self.distillation['trainable']!r}: expected all or "
                                   "motion_modules")
        decay = self.distillation["target_ema_decay"]
        if decay is not None and not 0.0 <= float(decay) < 1.0:
            raise AniPortraitError(f"model.distillation.target_ema_decay={decay}: expected [0, 1), or null (the "
                                   "student itself is the target)")
        if self.ema is not None:
            raise AniPortraitError("model.ema is for stages 1 and 2; distillation keeps its own target network "
                                   "(model.distillation.target_ema_decay): set model.ema.decay=null")
        if self.performance["cuda_graphs"] is True:
            raise AniPortraitError("model.performance.cuda_graphs captures stage 1 / 2's prediction, not the "
                                   "distillation step: set it to false (or auto) for model=video_distill")
        self.performance["cuda_graphs"] = False  # auto: the distillation step runs eagerly
        self.schedule = ConsistencySchedule(self.noise_scheduler.alphas_cumprod,
                                            int(self.distillation["num_ddim_timesteps"]), self.prediction_type,
                                            float(self.distillation["timestep_scaling"]))
        self.teacher_sampling = self.sampling  # the bundle's default sampler (the teacher's)
        self.sampling = {**self.sampling, **self.distilled_sampling()}  # validation and held-out videos: the student
        self.student_unet = UNet3DConditionModel.from_config(self.denoising_unet.config)
        self.target_unet = UNet3DConditionModel.from_config(self.denoising_unet.config) if decay is not None else None
        self._start_student()
        for unet in (self.student_unet, self.target_unet):
            if unet is not None:
                self.reference_control.add_reader(unet)
        if parse_checkpointing(self.hparams.gradient_checkpointing):  # true, false, or resolution levels
            set_gradient_checkpointing(self.student_unet, self.hparams.gradient_checkpointing)
        self._set_trainable()
        self._teacher_loaded = False
        self.train()

    # -- what trains ---------------------------------------------------------------------------------------

    def _set_trainable(self) -> None:
        for module in (self.reference_unet, self.pose_guider, self.denoising_unet):
            module.requires_grad_(False)
        if getattr(self, "student_unet", None) is None:  # the base class's call, before the student exists
            return
        if self.target_unet is not None:
            self.target_unet.requires_grad_(False)
        if self.distillation["trainable"] == "all":
            self.student_unet.requires_grad_(True)
        else:
            self.student_unet.requires_grad_(False)
            for param in self.student_unet.motion_module_parameters():
                param.requires_grad_(True)

    def _frozen_modules(self) -> list[torch.nn.Module]:
        frozen = [self.reference_unet, self.pose_guider, self.denoising_unet]
        return frozen + ([self.target_unet] if getattr(self, "target_unet", None) is not None else [])

    # -- initial weights: the teacher ----------------------------------------------------------------------

    def inherit(self, previous: Mapping[str, pl.LightningModule]) -> None:
        """A ``model=all`` run: the VAE and the just-trained stage 2 are the teacher (unless ``teacher`` is set)."""
        super(VideoStage2Module, self).inherit(previous)  # the VAE only: stage 2's stage-1 hand-over does not apply
        stage2 = [module for module in previous.values() if type(module) is VideoStage2Module]
        if stage2 and not self.hparams.teacher:
            _, state_dicts, _, _ = stage2[-1].bundle_parts()
            self._load_teacher_state(state_dicts, f"stage-2 module {type(stage2[-1]).__name__}")
            self.data_settings = {**stage2[-1].data_settings, **self.data_settings}

    def _load_teacher_state(self, state_dicts: Mapping[str, Mapping[str, torch.Tensor]], source: str) -> None:
        self._load_stage1_state(state_dicts, source)
        self.denoising_unet.load_motion_modules(state_dicts["motion_module"])
        self._teacher_loaded = True
        self._start_student()

    def _start_student(self) -> None:
        """The student (and its target) start as the teacher (same class and config: every key matches)."""
        state = self.denoising_unet.state_dict()
        for unet in (self.student_unet, self.target_unet):
            if unet is not None:
                unet.load_state_dict(state)

    def _initialise_weights(self) -> None:
        given = sorted(name for name, source in self.init_sources.items() if source)
        if given:
            raise AniPortraitError(f"model.init.{given[0]} is for stages 1 and 2: distillation starts from "
                                   "model.teacher (the whole stage-2 bundle)")
        if self._teacher_loaded:
            return
        teacher = self.hparams.teacher
        if not teacher:
            self._stage1_missing = True  # decided in on_fit_start (a resumed run restores every weight)
            return
        path = Path(teacher).expanduser()
        if not (path / BUNDLE_FILE).is_file():
            raise AniPortraitError(f"model.teacher={teacher}: not a bundle folder (no {BUNDLE_FILE}); give the bundle "
                                   "a model=video_stage2 (or model=all) run printed")
        bundle = Bundle.open(path)
        parts = ("reference_unet", "denoising_unet", "pose_guider", "motion_module")
        bundle.require(*parts, purpose="model.teacher (a stage-2 bundle)")
        self._load_teacher_state({name: bundle.state_dict(name) for name in parts}, str(path))
        if bundle.has("vae") and not dict(self.hparams.backbone or {}).get("vae"):
            self.use_vae(bundle.load("vae"))  # the teacher was trained through this VAE

    def on_fit_start(self) -> None:
        if getattr(self, "_stage1_missing", False) and not getattr(self, "_restored_from_checkpoint", False):
            raise AniPortraitError("model.teacher is not set: distillation needs a trained stage 2. Set "
                                   "model.teacher=PATH to the bundle a model=video_stage2 or model=all run printed")
        if self._latent_cache_datasets():
            raise AniPortraitError("model.loader.latent_cache=true is for stages 1 and 2; stage 3 (video_distill) "
                                   "reads pixels: set model.loader.latent_cache=false for it")

    # -- one step ------------------------------------------------------------------------------------------

    def _condition(self, batch: Mapping[str, torch.Tensor], generators: list[torch.Generator]
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """CLIP embeddings (b, 1, D) and pose features of a batch; the ReferenceNet's pass fills the bank that
        teacher, student and target all read."""
        batch_size = len(batch["reference_image"])
        reference_latents = self._sample_latents(batch["reference_image"], generators)  # (b, 4, h, w)
        clip_embeds = self._clip_embeds(batch["clip_image"], torch.zeros(batch_size, dtype=torch.bool))
        pose_features = self.pose_guider(batch["pose_images"].transpose(1, 2), batch["reference_pose"])
        self.reference_control.write()
        self.reference_unet(reference_latents, torch.zeros(batch_size, device=self.device, dtype=torch.long),
                            clip_embeds)
        return clip_embeds, pose_features

    def _output(self, unet: torch.nn.Module, sample: torch.Tensor, timesteps: torch.Tensor, clip_embeds: torch.Tensor,
                pose_features: list[torch.Tensor], uncond: bool = False) -> torch.Tensor:
        """One UNet's output (b, 4, f, h, w), float; ``uncond``: zero CLIP embedding and own tokens only, as the
        unconditional half of sampling's CFG."""
        batch_size, num_frames = sample.shape[0], sample.shape[2]
        self.reference_control.read(num_frames=num_frames, uncond_mask=[True] * batch_size if uncond else None)
        embeds = torch.zeros_like(clip_embeds) if uncond else clip_embeds
        return unet(sample, timesteps, embeds, pose_cond_fea=pose_features).sample.float()

    def _guided_teacher(self, sample: torch.Tensor, timesteps: torch.Tensor, clip_embeds: torch.Tensor,
                        pose_features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's prediction under the pipeline's CFG, as (x0, noise)."""
        x0_uncond, noise_uncond = self.schedule.x0_and_noise(
            self._output(self.denoising_unet, sample, timesteps, clip_embeds, pose_features, uncond=True),
            sample, timesteps)
        x0_cond, noise_cond = self.schedule.x0_and_noise(
            self._output(self.denoising_unet, sample, timesteps, clip_embeds, pose_features), sample, timesteps)
        guidance = float(self.distillation["guidance_scale"])
        return x0_uncond + guidance * (x0_cond - x0_uncond), noise_uncond + guidance * (noise_cond - noise_uncond)

    def _distillation_loss(self, batch: Mapping[str, torch.Tensor], stream: int) -> torch.Tensor:
        cpu_generators, generators = self._generators(batch, stream)
        pixel_values = batch["pixel_values"]  # (b, f, 3, H, W)
        batch_size, num_frames = pixel_values.shape[:2]
        indices = torch.cat([torch.randint(0, len(self.schedule.ddim_timesteps), (1,), generator=generator)
                             for generator in cpu_generators])
        start, end = (timesteps.to(self.device) for timesteps in self.schedule.interval(indices))  # (b,) each
        self._prepare_frozen()
        with torch.no_grad():
            latents = self._sample_latents(pixel_values.flatten(0, 1), generators)  # (b f, 4, h, w)
            latents = latents.unflatten(0, (batch_size, num_frames)).transpose(1, 2)  # (b, 4, f, h, w)
            clip_embeds, pose_features = self._condition(batch, generators)
        noise = self._randn(latents.shape[1:], generators)
        noisy = self.schedule.add_noise(latents, noise, start)  # x_t (b, 4, f, h, w)
        student = self.schedule.consistency(
            self._output(self.student_unet, noisy, start, clip_embeds, pose_features), noisy, start)
        with torch.no_grad():
            previous = self.schedule.ddim_step(*self._guided_teacher(noisy, start, clip_embeds, pose_features),
                                               end)  # x_s, one teacher step from t
            target_net = self.target_unet if self.target_unet is not None else self.student_unet
            target = self.schedule.consistency(
                self._output(target_net, previous, end, clip_embeds, pose_features), previous, end)
        if self.distillation["loss"] == "mse":
            return F.mse_loss(student, target)
        c = float(self.distillation["huber_c"])
        return (torch.sqrt((student - target) ** 2 + c**2) - c).mean()

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._distillation_loss(batch, stream=0)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["sample_index"]))
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        size = len(batch["sample_index"])
        loss = self._distillation_loss(batch, stream=1)  # fixed noise and timesteps per sample: comparable runs
        self.log("val/loss", loss, batch_size=size, sync_dist=True)
        self.log("val/teacher_gap", self._teacher_gap(batch), batch_size=size, sync_dist=True)
        self.reference_control.clear()

    @torch.no_grad()
    def _teacher_gap(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """What distillation is for, measured: from the same pure noise, the mean squared latent difference between
        the student's few-step LCM sample (no guidance) and the teacher's guided DDIM sample on the solver's grid
        (``distillation.validation_teacher_steps`` steps). It falls as the student learns; ``val/loss`` (student
        against its moving EMA target) need not."""
        from aniportrait.models.schedulers import build_scheduler

        cpu_generators, generators = self._generators(batch, stream=2)
        pixel_values = batch["pixel_values"]
        batch_size, num_frames = pixel_values.shape[:2]
        self._prepare_frozen()
        clip_embeds, pose_features = self._condition(batch, generators)
        height, width = (size // 2 ** (len(self.frozen.vae.config.block_out_channels) - 1)
                         for size in pixel_values.shape[-2:])
        start = self._randn((self.student_unet.config.in_channels, num_frames, height, width), generators)

        def at(timestep: Any) -> torch.Tensor:
            return torch.full((batch_size,), int(timestep), device=self.device, dtype=torch.long)

        grid = self.schedule.ddim_timesteps.flip(0)
        stride = max(1, len(grid) // int(self.distillation["validation_teacher_steps"]))
        teacher_timesteps, teacher = grid[::stride].tolist(), start
        for index, timestep in enumerate(teacher_timesteps):
            x0, noise = self._guided_teacher(teacher, at(timestep), clip_embeds, pose_features)
            last = index + 1 == len(teacher_timesteps)
            teacher = x0 if last else self.schedule.ddim_step(x0, noise, at(teacher_timesteps[index + 1]))

        scheduler = build_scheduler(self.distilled_sampling()["scheduler"])
        scheduler.set_timesteps(int(self.distillation["num_inference_steps"]), device=self.device)
        student, denoised = start, start
        for timestep in scheduler.timesteps:
            output = self._output(self.student_unet, student, at(timestep), clip_embeds, pose_features)
            student, denoised = scheduler.step(output, timestep, student, generator=cpu_generators[0],
                                               return_dict=False)
        self.reference_control.clear()
        return F.mse_loss(denoised.float(), teacher)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer's step, then the target's: inside the training batch, so that a checkpoint written at its
        end (callbacks run before the module's own batch-end hook) holds the target that the next step reads."""
        super().optimizer_step(*args, **kwargs)
        self.update_target()

    @torch.no_grad()
    def update_target(self) -> None:
        """target <- decay * target + (1 - decay) * student."""
        if self.target_unet is None:
            return
        decay = float(self.distillation["target_ema_decay"])
        targets = list(self.target_unet.parameters())
        torch._foreach_lerp_(targets, [p.detach().to(t.dtype) for p, t in
                                       zip(self.student_unet.parameters(), targets)], 1.0 - decay)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.reference_control.clear()

    # -- sampling and export -------------------------------------------------------------------------------

    def distilled_sampling(self) -> dict[str, Any]:
        settings = self.distillation
        return {"scheduler": lcm_scheduler_config(dict(self.noise_scheduler.config), settings["num_ddim_timesteps"],
                                                  settings["timestep_scaling"]),
                "num_inference_steps": int(settings["num_inference_steps"]), "guidance_scale": 1.0,
                "teacher_guidance_scale": float(settings["guidance_scale"]), "method": "latent consistency distillation"}

    def sampling_pipeline(self):
        """The student with its sampler (``self.sampling``): validation and held-out videos show what the export
        samples with ``distilled=True``."""
        pipeline = super().sampling_pipeline()
        pipeline.denoising_unet = self.student_unet
        return pipeline

    def exported_sampling(self) -> dict[str, Any]:
        return self.teacher_sampling

    def bundle_settings(self) -> dict[str, Any]:
        settings = super().bundle_settings()
        settings["video"]["distilled"] = self.distilled_sampling()
        return settings

    def bundle_parts(self):
        components, state_dicts, settings, base_models = super().bundle_parts()
        state = self.student_unet.state_dict()
        components["distilled_denoising_unet"] = self.student_unet
        components["distilled_motion_module"] = self.student_unet
        state_dicts["distilled_denoising_unet"] = {k: v for k, v in state.items() if ".motion_modules." not in k}
        state_dicts["distilled_motion_module"] = {k: v for k, v in state.items() if ".motion_modules." in k}
        return components, state_dicts, settings, base_models
