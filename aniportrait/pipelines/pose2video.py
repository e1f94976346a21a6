"""Pose-to-video sampling: a reference portrait and a sequence of pose images -> video frames.

Per video (official ``pipeline_pose2vid_long.py`` semantics, minus its per-step recomputation):

* the CLIP image embedding and the ReferenceNet's reference tokens are computed once (ReferenceNet at
  timestep 0), and the PoseGuider's features once per context window (they depend on no timestep); the next call
  with the same reference image, size, guidance and weights (a stream's next chunk, a batch of drivers for one
  portrait) reuses the embedding, the tokens and their key/value projections (about 70 MB at SD-1.5 shapes);
* classifier-free guidance: the unconditional half gets a zero CLIP embedding and no reference tokens
  (the reference-attention reader lets those rows attend to their own tokens only), as official;
* videos longer than ``context_frames`` are denoised in overlapping windows (``context_overlap`` frames shared by
  neighbours) whose predictions are combined at every step by the preset's context schedule
  (:mod:`aniportrait.pipelines.context`): ``blended`` (linear ramps, no seams) or the official ``uniform``;
* the sampling ``preset`` (:mod:`aniportrait.pipelines.presets`) fixes every other choice that changes the frames:
  ``"project"`` (models trained here) or ``"official"`` (the official pipeline's frames, checked against fixtures
  made by the official code); ``from_bundle`` takes it from the bundle's ``settings.video.sampling``;
* any diffusers scheduler (default: the official inference_v2 DDIM, v-prediction, zero terminal SNR,
  trailing spacing); ``generator`` seeds the initial noise (and stochastic schedulers);
* the VAE decodes in batches of frames: :meth:`Pose2VideoPipeline.frames` yields them as they are decoded,
  ``__call__`` returns the whole video, uint8 (T, H, W, 3) or float in [0, 1].

Pose images are an array (T, H, W, 3) uint8 or any sequence with ``len()`` whose ``[indices]`` (an int array)
gives those frames as such an array: they are fetched window by window, so a long video never needs all of them
at once. They pass through :func:`aniportrait.models.pose_image_scaling.scale_pose_images` with the
pipeline's ``pose_scaling``: "official_inference" for the official release weights, "unit" for models
trained here (``from_bundle`` takes it from the bundle).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from aniportrait.bundle import Bundle
from aniportrait.errors import AniPortraitError
from aniportrait.models.checkpoints import load_state_dict_checked
from aniportrait.models.pose_guider import PoseGuider
from aniportrait.models.pose_image_scaling import POSE_IMAGE_SCALINGS, scale_pose_images
from aniportrait.models.reference_attention import ReferenceAttentionControl
from aniportrait.models.reference_unet import ReferenceNet
from aniportrait.models.schedulers import INFERENCE_V2_SCHEDULER, build_scheduler
from aniportrait.models.unet3d import MOTION_MODULE_KEYS, UNet3DConditionModel
from aniportrait.models.video_backbone import RANDOM_BACKBONES, build_frozen_encoders
from aniportrait.pipelines.context import ContextSchedule, context_schedule, context_windows, window_weights
from aniportrait.pipelines.presets import (
    OFFICIAL_CLIP_SIZE,
    SAMPLING_PRESETS,
    SamplingPreset,
    resize_images,
    sampling_preset,
    to_uint8,
)

__all__ = [
    "Pose2VideoPipeline",
    "INFERENCE_V2_SCHEDULER",
    "SAMPLING_PRESETS",
    "build_scheduler",
    "context_windows",
    "window_weights",
    "load_vae_and_image_encoder",
]

log = logging.getLogger(__name__)

# Frames per VAE decoder call. The official pipeline decodes one at a time (7.9 GiB peak for 48 frames at 512 x 512
# on an H200); 16 at a time took ours to 13.2 GiB. Each decoded frame's activations cost 0.35-0.5 GB in bf16, while
# one 512 x 512 frame already keeps the GPU busy, so 2 keep the peak near the official's at next to no speed cost
# (benchmarks/README.md; the GPU figure for 2 is still to be measured).
DECODE_BATCH_SIZE = 2


def load_vae_and_image_encoder(backbone: Mapping[str, Any], with_vae: bool = True,
                               ) -> tuple[AutoencoderKL | None, CLIPVisionModelWithProjection, CLIPImageProcessor]:
    """The frozen base models a bundle refers to (``base_models.video``: the training backbone's settings).

    ``kind: sd15`` loads ``vae`` (or ``base_model``'s ``vae/``) and ``image_encoder`` (root or ``image_encoder/``)
    without touching the SD UNet weights; the random-init kinds (``tiny``, ``small``) rebuild their seeded VAE and
    CLIP. with_vae=False: no VAE (None), for bundles that hold their own (``model=vae``'s, see ``from_bundle``).
    """
    kind = backbone.get("kind")
    if kind in RANDOM_BACKBONES:
        vae, image_encoder, processor = build_frozen_encoders(backbone)
        return (vae if with_vae else None), image_encoder, processor
    if kind != "sd15":
        raise AniPortraitError(f"base_models.video.kind={kind!r}: expected 'sd15' or one of {sorted(RANDOM_BACKBONES)}")
    local_only = bool(backbone.get("local_files_only", False))
    vae_key = "vae" if backbone.get("vae") else "base_model"
    vae_location = backbone.get(vae_key)
    encoder_location = backbone.get("image_encoder")
    for key, value in ([(vae_key, vae_location)] if with_vae else []) + [("image_encoder", encoder_location)]:
        if not value:
            raise AniPortraitError(f"base_models.video.{key} is not set: the bundle must name the VAE and the CLIP image "
                                   "encoder it was trained with (pass backbone= to override)")
    subfolder = backbone.get("image_encoder_subfolder")
    if subfolder is None and Path(str(encoder_location)).is_dir() and not (Path(encoder_location) / "config.json").is_file():
        subfolder = "image_encoder"
    vae = None
    if with_vae:
        with _naming(vae_key, vae_location):
            vae = AutoencoderKL.from_pretrained(vae_location, subfolder=None if vae_key == "vae" else "vae",
                                                local_files_only=local_only).eval()
    with _naming("image_encoder", encoder_location):
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(encoder_location, subfolder=subfolder or "",
                                                                      local_files_only=local_only)
    return vae, image_encoder.eval(), CLIPImageProcessor()


@contextlib.contextmanager
def _naming(key: str, location: str) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        raise AniPortraitError(f"base_models.video.{key}={location!r}: could not load it ({error}); point it (or "
                               "the backbone= override) at a local directory or hub id holding the model") from error


def _load_denoising_unet(bundle: Bundle, prefix: str = "") -> UNet3DConditionModel:
    """The 2-D weights (``denoising_unet``) plus, when present, the motion modules (``motion_module``); with
    ``prefix="distilled_"`` the distilled student's (``model=video_distill``)."""
    unet_name, motion_name = f"{prefix}denoising_unet", f"{prefix}motion_module"
    with_motion = bundle.has(motion_name)
    config = dict(bundle.components[motion_name if with_motion else unet_name]["config"])
    unet = UNet3DConditionModel(**{**config, "use_motion_module": with_motion})
    load_state_dict_checked(unet, bundle.state_dict(unet_name), f"{unet_name} ({bundle.path})",
                            allow_missing=(MOTION_MODULE_KEYS,) if with_motion else ())
    if with_motion:
        unet.load_motion_modules(bundle.state_dict(motion_name))
    else:
        log.info("bundle %s has no motion_module: frames are generated independently (a stage-1 model)", bundle.path)
    return unet.eval()


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


@dataclass
class _ReferenceMemo:
    """One call's reference pass, reused by the next call with the same :meth:`Pose2VideoPipeline._reference_key`."""

    key: tuple
    embeds: torch.Tensor
    bank: dict[str, torch.Tensor]
    projections: dict[str, tuple[torch.Tensor, torch.Tensor]]


class Pose2VideoPipeline:
    """Reference image + pose images -> video, with the models of stage B (see the module docstring).

    ``reference_control``: an existing :class:`ReferenceAttentionControl` of these two UNets (training
    modules pass theirs); by default the pipeline installs its own. The modules are used as given: put them
    in eval mode (``from_bundle`` does). ``preset``: ``"project"``, ``"official"`` or a
    :class:`~aniportrait.pipelines.presets.SamplingPreset`.
    """

    def __init__(self, vae: AutoencoderKL, image_encoder: CLIPVisionModelWithProjection,
                 clip_image_processor: CLIPImageProcessor, reference_unet: ReferenceNet,
                 denoising_unet: UNet3DConditionModel, pose_guider: PoseGuider, scheduler: SchedulerMixin,
                 pose_scaling: str = "official_inference", reference_control: ReferenceAttentionControl | None = None,
                 preset: str | SamplingPreset = "project"):
        if pose_scaling not in POSE_IMAGE_SCALINGS:
            raise AniPortraitError(f"pose_scaling={pose_scaling!r}: expected one of {POSE_IMAGE_SCALINGS}")
        self.vae, self.image_encoder, self.clip_image_processor = vae, image_encoder, clip_image_processor
        self.reference_unet, self.denoising_unet, self.pose_guider = reference_unet, denoising_unet, pose_guider
        self.scheduler, self.pose_scaling = scheduler, pose_scaling
        self.preset = sampling_preset(preset)
        self.reference_control = reference_control or ReferenceAttentionControl(reference_unet, denoising_unet)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.vae_image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True)
        self.video_settings: dict[str, Any] = {}  # a bundle's settings["video"] (from_bundle)
        self._reference_memo: _ReferenceMemo | None = None  # the last call's reference pass (see _reference_key)

    @classmethod
    def from_bundle(cls, bundle: Bundle | str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, backbone: Mapping[str, Any] | None = None,
                    scheduler: Mapping[str, Any] | None = None,
                    preset: str | SamplingPreset | None = None, distilled: bool = False) -> Pose2VideoPipeline:
        """Build from a bundle with stage-B components plus the base models it names.

        dtype: None = float32 on CPU; on CUDA float16 with the official preset (as the official scripts), else
        bfloat16. backbone: overrides ``base_models.video`` (e.g. SD-1.5
        elsewhere on this machine). scheduler: overrides the bundle's sampling scheduler config. preset: overrides
        the bundle's ``settings.video.sampling`` (``official`` in bundles imported from the release, else
        ``project``). A bundle with its own ``vae`` component decodes with it; the image encoder always comes
        from the base models. distilled: sample with the bundle's distilled student (``model=video_distill``) and
        its sampler, steps and guidance (``settings.video.distilled``) instead of the teacher.
        """
        bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        bundle.require("reference_unet", "denoising_unet", "pose_guider", purpose="pose-to-video generation")
        settings = dict(bundle.settings.get("video", {}))
        if distilled:
            if not bundle.has("distilled_denoising_unet") or "distilled" not in settings:
                raise AniPortraitError(f"bundle {bundle.path} has no distilled student (fast=true / distilled=True): "
                                       "train one with `python train.py model=video_distill model.teacher=BUNDLE`, "
                                       "or sample the teacher (fast=false)")
            student = dict(settings["distilled"])
            settings.update({key: student[key] for key in ("scheduler", "num_inference_steps", "guidance_scale")})
            # a few-step student runs the whole UNet at each of its steps (deep features of 1-4 steps apart: untested)
            settings["deep_cache_interval"] = int(student.get("deep_cache_interval", 1))
        backbone = backbone or bundle.base_models.get("video")
        if not backbone:
            raise AniPortraitError(f"bundle {bundle.path} names no base_models.video (VAE and image encoder); pass "
                                   "backbone={'kind': 'sd15', 'base_model': ..., 'image_encoder': ...}")
        own_vae = bundle.has("vae")  # trained by model=vae for a backbone without a pretrained one
        vae, image_encoder, clip_image_processor = load_vae_and_image_encoder(backbone, with_vae=not own_vae)
        if own_vae:
            vae = bundle.load("vae")
        pipeline = cls(vae, image_encoder, clip_image_processor, bundle.load("reference_unet"),
                       _load_denoising_unet(bundle, "distilled_" if distilled else ""), bundle.load("pose_guider"),
                       build_scheduler(scheduler or settings.get("scheduler")),
                       pose_scaling=settings.get("pose_scaling", "official_inference"),
                       preset=preset or settings.get("sampling", "project"))
        pipeline.video_settings = settings
        device = torch.device(device)
        if dtype is None:  # the official scripts sample in fp16 (weight_dtype: fp16); bf16 is our default on GPUs
            dtype = torch.float32 if device.type != "cuda" else (
                torch.float16 if pipeline.preset.name == "official" else torch.bfloat16)
        return pipeline.to(device, dtype)

    def optimize(self, channels_last: bool = False, compile: Mapping[str, Any] | bool | None = None) -> Pose2VideoPipeline:
        """Speed switches that keep the function (benchmarks/README.md): channels-last convolution weights
        (NHWC tensor-core kernels without layout conversions) and ``torch.compile`` of the denoising UNet and
        the VAE decoder (fused kernels, fewer launches; ``{"mode": "reduce-overhead"}`` adds CUDA graphs)."""
        if channels_last:
            for module in (self.vae, self.reference_unet, self.denoising_unet, self.pose_guider):
                module.to(memory_format=torch.channels_last)
        if compile is not None and compile is not False:  # True or a dict of torch.compile options ({} = defaults)
            options = {} if compile is True else dict(compile)
            self.denoising_unet.compile(**options)
            self.vae.decoder.compile(**options)
        return self

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> Pose2VideoPipeline:
        for module in (self.vae, self.image_encoder, self.reference_unet, self.denoising_unet, self.pose_guider):
            module.to(device=device)
            if dtype is not None and _module_dtype(module) != dtype:
                module.to(dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.denoising_unet.parameters()).device

    # -- inputs -------------------------------------------------------------------------------------------

    @staticmethod
    def _check_image(name: str, image: np.ndarray, ndim: int) -> np.ndarray:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != ndim or image.shape[-1] != 3:
            layout = "(H, W, 3)" if ndim == 3 else "(T, H, W, 3)"
            raise AniPortraitError(f"{name} must be uint8 RGB {layout}, got {image.dtype} {image.shape}; drop alpha "
                                   "channels and convert grayscale to RGB first")
        return image

    def _pose_tensor(self, pose_images: np.ndarray, height: int, width: int) -> torch.Tensor:
        """(n, h, w, 3) uint8 -> (1, 3, n, height, width), resized as the preset says, in the PoseGuider's range
        and dtype."""
        pose_images = resize_images(pose_images, height, width, self.preset.pose_resampling)
        pose = torch.from_numpy(np.ascontiguousarray(pose_images)).permute(3, 0, 1, 2).unsqueeze(0)
        return scale_pose_images(pose, self.pose_scaling).to(self.device, _module_dtype(self.pose_guider))

    def _reference_inputs(self, reference_image: np.ndarray, height: int, width: int) -> tuple[torch.Tensor, Any]:
        """The reference as the VAE sees it, (1, 3, height, width) in [-1, 1], and the image for the CLIP processor."""
        if self.preset.reference_resampling == "lanczos":  # the official ref_image_processor.preprocess(PIL image)
            pixels = self.vae_image_processor.preprocess(Image.fromarray(reference_image), height=height, width=width)
            resized = None
        else:
            resized = resize_images(reference_image[None], height, width, self.preset.reference_resampling)[0]
            pixels = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        if self.preset.clip_input == "stretched_source":  # the original, whatever its aspect ratio
            return pixels, Image.fromarray(reference_image).resize((OFFICIAL_CLIP_SIZE,) * 2, Image.BICUBIC)
        if resized is None:
            resized = resize_images(reference_image[None], height, width, self.preset.reference_resampling)[0]
        return pixels, resized

    # -- sampling -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        reference_image: np.ndarray,
        pose_images: Any,
        reference_pose: np.ndarray | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.5,
        context_frames: int | str = 16,
        context_overlap: int = 4,
        generator: torch.Generator | None = None,
        progress: bool = True,
        width: int | None = None,
        height: int | None = None,
        decode_batch_size: int = DECODE_BATCH_SIZE,
        eta: float = 0.0,
        cache_pose_features: bool = True,
        window_batch: int = 1,
        output_type: str = "uint8",
        deep_cache_interval: int = 1,
    ) -> np.ndarray:
        """Generate one frame per pose image.

        reference_image: (H, W, 3) uint8 RGB portrait, any size; pose_images: (T, H, W, 3) uint8 (or a sequence, see
        the module docstring); reference_pose: the reference's pose image (a ``reference_attention: cross``
        PoseGuider uses it). width x height: output size, multiples of 8 (default: the pose images'); inputs are
        resized to it as the preset says. guidance_scale == 1 (``<= 1`` in the official preset) skips the
        unconditional pass. cache_pose_features: keep the PoseGuider's features of every window for all steps
        (about 4 MB per frame at 512 x 512 in bf16) instead of recomputing them. context_frames: the window length,
        or "auto" with the blended schedule (the fewest windows of at most 32 frames; see context_windows).
        decode_batch_size: frames per VAE decoder call; the decoder's activations at 512 x 512 take about 0.35-0.5 GB
        a frame in bf16 (0.7-1.0 GB in fp32, measured on the CPU), and a few frames already fill a GPU.
        window_batch: windows denoised together in one UNet call (with both guidance halves): the same
        computation in fewer, larger launches (1: one window per call). output_type: "uint8" (T, height, width, 3)
        or "float" (T, height, width, 3) in [0, 1]. deep_cache_interval: N > 1 runs the whole UNet every N-th
        step and, in between, only its top level on the deep features kept from the last whole step (DeepCache;
        fewer FLOPs, other frames: measure the quality); 1 (default): the whole UNet at every step.
        """
        return np.concatenate(list(self.frames(
            reference_image, pose_images, reference_pose, num_inference_steps, guidance_scale, context_frames,
            context_overlap, generator, progress, width, height, decode_batch_size, eta, cache_pose_features,
            window_batch, output_type, deep_cache_interval)))

    def frames(self, reference_image: np.ndarray, pose_images: Any, reference_pose: np.ndarray | None = None,
               num_inference_steps: int = 25, guidance_scale: float = 3.5, context_frames: int | str = 16,
               context_overlap: int = 4, generator: torch.Generator | None = None, progress: bool = True,
               width: int | None = None, height: int | None = None, decode_batch_size: int = DECODE_BATCH_SIZE, eta: float = 0.0,
               cache_pose_features: bool = True, window_batch: int = 1, output_type: str = "uint8",
               deep_cache_interval: int = 1) -> Iterator[np.ndarray]:
        """:meth:`__call__`, the frames yielded ``decode_batch_size`` at a time as the VAE decodes them."""
        if output_type not in ("uint8", "float"):
            raise AniPortraitError(f"output_type={output_type!r}: expected uint8 or float")
        latents = self.denoise(reference_image, pose_images, reference_pose, num_inference_steps, guidance_scale,
                               context_frames, context_overlap, generator, progress, width, height, eta,
                               cache_pose_features, window_batch, deep_cache_interval)
        yield from self.decode(latents, decode_batch_size, output_type)

    @torch.no_grad()
    def denoise(self, reference_image: np.ndarray, pose_images: Any, reference_pose: np.ndarray | None = None,
                num_inference_steps: int = 25, guidance_scale: float = 3.5, context_frames: int | str = 16,
                context_overlap: int = 4, generator: torch.Generator | None = None, progress: bool = True,
                width: int | None = None, height: int | None = None, eta: float = 0.0,
                cache_pose_features: bool = True, window_batch: int = 1, deep_cache_interval: int = 1,
                ) -> torch.Tensor:
        """The denoising loop of :meth:`__call__`: the final latents (1, 4, T, height / 8, width / 8)."""
        if int(deep_cache_interval) != deep_cache_interval or deep_cache_interval < 1:
            raise AniPortraitError(f"deep_cache_interval={deep_cache_interval}: give a whole number >= 1 "
                                   "(1: the whole UNet at every step)")
        reference_image = self._check_image("reference_image", reference_image, 3)
        if isinstance(pose_images, (list, tuple)):
            pose_images = np.asarray(pose_images)
        num_frames = len(pose_images)
        if num_frames < 1:
            raise AniPortraitError("pose-to-video needs at least one pose image")

        def fetch(indices: np.ndarray) -> np.ndarray:
            return self._check_image("pose_images", pose_images[indices], 4)

        if isinstance(pose_images, np.ndarray):
            self._check_image("pose_images", pose_images, 4)
        pose_size = fetch(np.array([0])).shape[1:3]
        height, width = int(height or pose_size[0]), int(width or pose_size[1])
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise AniPortraitError(f"output size {width} x {height} must be a multiple of {self.vae_scale_factor} on "
                                   "both sides: pass width= and height= (e.g. 512), or resize the pose images")
        preset = self.preset
        guided = guidance_scale > 1.0 if preset.guidance_above_one else guidance_scale != 1.0
        schedule = context_schedule(preset.context_schedule, num_frames, context_frames, context_overlap, guided)
        device, unet_dtype = self.device, _module_dtype(self.denoising_unet)
        latents_dtype = _module_dtype(self.image_encoder) if preset.latents_dtype == "image_encoder" else torch.float32

        key = self._reference_key(reference_image, height, width, guided)
        memo = self._reference_memo if self._reference_memo is not None and self._reference_memo.key == key else None
        self._reference_memo = None  # kept again below once this call's pass is complete
        reference_pose_tensor = None
        if reference_pose is not None:
            reference_pose = self._check_image("reference_pose", reference_pose, 3)
            reference_pose_tensor = self._pose_tensor(reference_pose[None], height, width)[:, :, 0]

        if memo is not None:
            embeds = memo.embeds
        else:
            reference_pixels, clip_image = self._reference_inputs(reference_image, height, width)
            embeds = self._clip_embeds(clip_image)  # (1, 1, D)
            if guided:
                embeds = torch.cat([torch.zeros_like(embeds), embeds])  # (2, 1, D): [uncond; cond]
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = randn_tensor((1, self.denoising_unet.config.in_channels, num_frames, height // self.vae_scale_factor,
                                width // self.vae_scale_factor), generator=generator, device=device, dtype=latents_dtype)
        latents = latents * self.scheduler.init_noise_sigma  # (1, 4, T, h, w)
        step_kwargs = self._step_kwargs(generator, eta)

        def features(index: int) -> list[torch.Tensor]:
            pose = self._pose_tensor(fetch(schedule.windows[index].numpy()), height, width)  # (1, 3, n, H, W)
            return self.pose_guider(pose, reference_pose_tensor)  # 5 x (1, C, n, h, w)

        cached = [features(index) for index in range(len(schedule))] if cache_pose_features else None
        groups = self._window_groups(schedule, window_batch)
        counts = schedule.counts(num_frames).to(device, latents_dtype).view(1, 1, -1, 1, 1)
        try:
            if memo is not None:
                self.reference_control.restore(memo.bank, memo.projections)
            else:
                self._write_reference(reference_pixels, embeds, guided)
            deep: dict[int, torch.Tensor] = {}  # per window group: the deep features of its last whole step
            for step, timestep in enumerate(tqdm(self.scheduler.timesteps, desc="denoising", disable=not progress)):
                noise_pred = latents.new_zeros((2 if guided else 1, *latents.shape[1:]))  # ([uncond;] cond, 4, T, h, w)
                whole = deep_cache_interval == 1 or step % deep_cache_interval == 0
                for number, group in enumerate(groups):
                    count, length = len(group), len(schedule.windows[group[0]])
                    model_input = torch.cat([latents[:, :, schedule.windows[index]] for index in group])  # (k, 4, n, h, w)
                    pose_features = [torch.cat(parts) for parts in zip(*(
                        cached[index] if cached else features(index) for index in group))]
                    if guided:  # rows [uncond x k; cond x k]: both halves see the same latents and poses
                        model_input = torch.cat([model_input, model_input])
                        pose_features = [torch.cat([feature, feature]) for feature in pose_features]
                    self.reference_control.read(num_frames=length, uncond_mask=[True] * count + [False] * count
                                                if guided else None, cache_projections=True)
                    output = self.denoising_unet(
                        self.scheduler.scale_model_input(model_input, timestep).to(unet_dtype), timestep,
                        embeds.repeat_interleave(count, dim=0).to(unet_dtype), pose_cond_fea=pose_features,
                        deep_features=None if whole else deep[number], keep_deep_features=deep_cache_interval > 1 and whole,
                    )
                    if deep_cache_interval > 1 and whole:
                        deep[number] = output.deep_features
                    prediction = output.sample.to(latents_dtype)  # (k or 2k, 4, n, h, w)
                    for row, index in enumerate(group):
                        window, window_prediction = schedule.windows[index], prediction[row::count]  # ([uncond;] cond)
                        if schedule.weights is not None:
                            window_prediction = window_prediction * schedule.weights[index].to(device).view(1, 1, -1, 1, 1)
                        noise_pred[:, :, window] = noise_pred[:, :, window] + window_prediction
                if schedule.average_by_count:
                    noise_pred = noise_pred / counts
                if guided:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise_pred, timestep, latents, **step_kwargs).prev_sample
            bank, projections = self.reference_control.snapshot()
            if all(path in bank for path in self.reference_control.paths):  # not an ablation's empty bank
                self._reference_memo = _ReferenceMemo(key, embeds, bank, projections)
        finally:
            self.reference_control.clear()
        return latents

    def forget_reference(self) -> None:
        """Drop the kept reference pass (its ~70 MB at SD-1.5 shapes); the next call runs it again. Benchmarks call
        this before each timed video, so that every one pays for its reference as a user's first video does."""
        self._reference_memo = None

    def _reference_key(self, reference_image: np.ndarray, height: int, width: int, guided: bool) -> tuple:
        """What the reference pass depends on: the image's pixels, the output size, guidance (the unconditional
        embedding and bank rows), the preset and every weight it touches (storage and in-place version: a
        ``load_state_dict``, ``to()`` or ``optimize`` changes them)."""
        weights = tuple((parameter.data_ptr(), parameter._version)
                        for module in (self.vae, self.image_encoder, self.reference_unet, self.denoising_unet)
                        for parameter in module.parameters())
        digest = hashlib.blake2b(np.ascontiguousarray(reference_image).data, digest_size=16).hexdigest()
        return digest, reference_image.shape, height, width, guided, self.preset, weights

    def _step_kwargs(self, generator: torch.Generator | None, eta: float) -> dict[str, Any]:
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        kwargs: dict[str, Any] = {}
        if "eta" in accepted:
            kwargs["eta"] = eta
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    def _clip_embeds(self, clip_image: Any) -> torch.Tensor:
        """The reference for CLIP (PIL image or (H, W, 3) uint8) -> (1, 1, D) CLIP image embedding."""
        pixels = self.clip_image_processor(images=clip_image, return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, _module_dtype(self.image_encoder))
        return self.image_encoder(pixels).image_embeds.unsqueeze(1)

    @staticmethod
    def _window_groups(schedule: ContextSchedule, window_batch: int) -> list[list[int]]:
        """Window indices in groups of at most ``window_batch`` windows of equal length (one UNet call each)."""
        if window_batch < 1:
            raise AniPortraitError(f"window_batch={window_batch}: need at least 1 window per UNet call")
        groups: list[list[int]] = []
        for index, window in enumerate(schedule.windows):
            last = groups[-1] if groups else None
            if last and len(last) < window_batch and len(schedule.windows[last[0]]) == len(window):
                last.append(index)
            else:
                groups.append([index])
        return groups

    def _write_reference(self, reference_pixels: torch.Tensor, embeds: torch.Tensor, guided: bool) -> None:
        """Fill the reference bank once (ReferenceNet at timestep 0 on the VAE mean); every UNet call reads it.
        The official preset runs the ReferenceNet on the whole ``[uncond; cond]`` batch and keeps the conditional
        half, in float16."""
        image = reference_pixels.to(self.device, _module_dtype(self.vae))
        latents = self.vae.encode(image).latent_dist.mean * self.vae.config.scaling_factor  # (1, 4, h, w)
        if not (guided and self.preset.unconditional_reference_pass):
            embeds = embeds[-1:]
        self.reference_control.write()
        dtype = _module_dtype(self.reference_unet)
        self.reference_unet(latents.repeat(len(embeds), 1, 1, 1).to(dtype), 0, embeds.to(dtype))
        self.reference_control.keep_bank(samples=slice(-1, None), dtype=self.preset.reference_bank_dtype)

    def decode(self, latents: torch.Tensor, batch_size: int = DECODE_BATCH_SIZE, output_type: str = "uint8",
               ) -> Iterator[np.ndarray]:
        """(1, 4, T, h, w) latents -> (k, H, W, 3) frames, ``batch_size`` per VAE call: uint8 as the preset rounds, or
        float in [0, 1].

        On a GPU the frames of one call are copied to the host (pinned, asynchronously) while the next call is
        queued, and yielded once that copy is done: the GPU never waits for the host to launch the next call, nor
        for the consumer to take the frames (small batches otherwise stall on one synchronisation per call)."""
        frames = 1 / self.vae.config.scaling_factor * latents[0].transpose(0, 1)  # (T, 4, h, w)
        dtype = _module_dtype(self.vae)
        asynchronous = frames.device.type == "cuda"
        pending: tuple[torch.Tensor, Any] | None = None
        for start in range(0, len(frames), max(1, batch_size)):
            with torch.no_grad():
                images = self.vae.decode(frames[start : start + batch_size].to(dtype)).sample.float()  # (k, 3, H, W)
            if output_type == "float":
                images = (images / 2 + 0.5).clamp(0, 1)
            else:
                images = to_uint8(images, self.preset.frames_to_uint8)
            images = images.permute(0, 2, 3, 1).contiguous()
            if not asynchronous:
                yield images.numpy()
                continue
            host = images.to("cpu", non_blocking=True)  # a pinned buffer, filled when the stream gets there
            done = torch.cuda.Event()
            done.record()
            if pending is not None:
                pending[1].synchronize()
                yield pending[0].numpy()
            pending = (host, done)
        if pending is not None:
            pending[1].synchronize()
            yield pending[0].numpy()
