"""Pose-to-video sampling: a reference portrait and a sequence of pose images -> video frames.

Per video (official ``pipeline_pose2vid_long.py`` semantics, minus its per-step recomputation):

* the CLIP image embedding and the ReferenceNet's reference tokens are computed once (ReferenceNet at
  timestep 0), and the PoseGuider's features once per context window (they depend on no timestep);
* classifier-free guidance: the unconditional half gets a zero CLIP embedding and no reference tokens
  (the reference-attention reader lets those rows attend to their own tokens only), as official;
* videos longer than ``context_frames`` are denoised in overlapping windows (``context_overlap`` frames
  shared by neighbours, the last window aligned to the end, no wrap-around); each step's per-frame
  predictions are blended with weights that ramp linearly across the overlaps, so there are no seams;
* any diffusers scheduler (default: the official inference_v2 DDIM, v-prediction, zero terminal SNR,
  trailing spacing); ``generator`` seeds the initial noise (and stochastic schedulers);
* the VAE decodes in batches of frames; output is uint8 (T, H, W, 3).

Pose images pass through :func:`aniportrait.models.pose_image_scaling.scale_pose_images` with the
pipeline's ``pose_scaling``: "official_inference" for the official release weights, "unit" for models
trained here (``from_bundle`` takes it from the bundle).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
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
from aniportrait.models.video_backbone import build_video_models

__all__ = [
    "Pose2VideoPipeline",
    "INFERENCE_V2_SCHEDULER",
    "build_scheduler",
    "context_windows",
    "window_weights",
    "load_vae_and_image_encoder",
]

log = logging.getLogger(__name__)

def context_windows(num_frames: int, context_frames: int | str = 16, context_overlap: int = 4,
                    max_frames: int = 32) -> list[slice]:
    """Windows covering ``range(num_frames)``, neighbours sharing ``context_overlap`` frames (more for the last,
    which ends at the last frame).

    ``context_frames`` is the window length, or ``"auto"``: the fewest windows of at most ``max_frames`` (the
    motion modules' position limit) with at least ``context_overlap`` shared frames, made as short as that
    allows, so overlaps are no larger than blending needs (48 frames: 2 windows of 26 instead of 4 of 16).
    """
    if num_frames < 1:
        raise AniPortraitError("pose-to-video needs at least one pose image")
    if context_frames == "auto":
        if not 0 <= context_overlap < max_frames:
            raise AniPortraitError(f"context_overlap={context_overlap}: need 0 <= context_overlap < {max_frames}")
        count = max(1, math.ceil((num_frames - context_overlap) / (max_frames - context_overlap)))
        context_frames = min(num_frames, math.ceil((num_frames + (count - 1) * context_overlap) / count))
    context_frames = int(context_frames)
    if context_frames < 1 or not 0 <= context_overlap < context_frames:
        raise AniPortraitError(f"context_frames={context_frames}, context_overlap={context_overlap}: need "
                               "context_frames >= 1 and 0 <= context_overlap < context_frames")
    if num_frames <= context_frames:
        return [slice(0, num_frames)]
    starts = list(range(0, num_frames - context_frames, context_frames - context_overlap)) + [num_frames - context_frames]
    return [slice(start, start + context_frames) for start in starts]


def window_weights(length: int, context_overlap: int) -> torch.Tensor:
    """(length,) blending weights of a window's frames: a linear ramp over ``context_overlap + 1`` frames at
    both ends, flat in between (normalised per frame over all windows that cover it)."""
    position = torch.arange(length, dtype=torch.float32)
    return torch.minimum(torch.minimum(position + 1, length - position), torch.tensor(context_overlap + 1.0))


def load_vae_and_image_encoder(backbone: Mapping[str, Any]) -> tuple[AutoencoderKL, CLIPVisionModelWithProjection,
                                                                       CLIPImageProcessor]:
    """The frozen base models a bundle refers to (``base_models.video``: the training backbone's settings).

    ``kind: tiny`` rebuilds the seeded tiny VAE and CLIP; ``kind: sd15`` loads ``vae`` (or ``base_model``'s
    ``vae/``) and ``image_encoder`` (root or ``image_encoder/``) without touching the SD UNet weights.
    """
    kind = backbone.get("kind")
    if kind == "tiny":
        models = build_video_models(backbone, use_motion_module=False)
        return models.vae, models.image_encoder, models.clip_image_processor
    if kind != "sd15":
        raise AniPortraitError(f"base_models.video.kind={kind!r}: expected 'sd15' or 'tiny'")
    local_only = bool(backbone.get("local_files_only", False))
    vae_key = "vae" if backbone.get("vae") else "base_model"
    vae_location = backbone.get(vae_key)
    encoder_location = backbone.get("image_encoder")
    for key, value in ((vae_key, vae_location), ("image_encoder", encoder_location)):
        if not value:
            raise AniPortraitError(f"base_models.video.{key} is not set: the bundle must name the VAE and the CLIP image "
                                   "encoder it was trained with (pass backbone= to override)")
    subfolder = backbone.get("image_encoder_subfolder")
    if subfolder is None and Path(str(encoder_location)).is_dir() and not (Path(encoder_location) / "config.json").is_file():
        subfolder = "image_encoder"
    with _naming(vae_key, vae_location):
        vae = AutoencoderKL.from_pretrained(vae_location, subfolder=None if vae_key == "vae" else "vae",
                                            local_files_only=local_only)
    with _naming("image_encoder", encoder_location):
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(encoder_location, subfolder=subfolder or "",
                                                                      local_files_only=local_only)
    return vae.eval(), image_encoder.eval(), CLIPImageProcessor()


@contextlib.contextmanager
def _naming(key: str, location: str) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        raise AniPortraitError(f"base_models.video.{key}={location!r}: could not load it ({error}); point it (or "
                               "the backbone= override) at a local directory or hub id holding the model") from error


def _load_denoising_unet(bundle: Bundle) -> UNet3DConditionModel:
    """The 2-D weights (``denoising_unet``) plus, when present, the motion modules (``motion_module``)."""
    with_motion = bundle.has("motion_module")
    config = dict(bundle.components["motion_module" if with_motion else "denoising_unet"]["config"])
    unet = UNet3DConditionModel(**{**config, "use_motion_module": with_motion})
    load_state_dict_checked(unet, bundle.state_dict("denoising_unet"), f"denoising_unet ({bundle.path})",
                            allow_missing=(MOTION_MODULE_KEYS,) if with_motion else ())
    if with_motion:
        unet.load_motion_modules(bundle.state_dict("motion_module"))
    else:
        log.info("bundle %s has no motion_module: frames are generated independently (a stage-1 model)", bundle.path)
    return unet.eval()


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class Pose2VideoPipeline:
    """Reference image + pose images -> video, with the models of stage B (see the module docstring).

    ``reference_control``: an existing :class:`ReferenceAttentionControl` of these two UNets (training
    modules pass theirs); by default the pipeline installs its own. The modules are used as given: put them
    in eval mode (``from_bundle`` does).
    """

    def __init__(self, vae: AutoencoderKL, image_encoder: CLIPVisionModelWithProjection,
                 clip_image_processor: CLIPImageProcessor, reference_unet: ReferenceNet,
                 denoising_unet: UNet3DConditionModel, pose_guider: PoseGuider, scheduler: SchedulerMixin,
                 pose_scaling: str = "official_inference", reference_control: ReferenceAttentionControl | None = None):
        if pose_scaling not in POSE_IMAGE_SCALINGS:
            raise AniPortraitError(f"pose_scaling={pose_scaling!r}: expected one of {POSE_IMAGE_SCALINGS}")
        self.vae, self.image_encoder, self.clip_image_processor = vae, image_encoder, clip_image_processor
        self.reference_unet, self.denoising_unet, self.pose_guider = reference_unet, denoising_unet, pose_guider
        self.scheduler, self.pose_scaling = scheduler, pose_scaling
        self.reference_control = reference_control or ReferenceAttentionControl(reference_unet, denoising_unet)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.video_settings: dict[str, Any] = {}  # a bundle's settings["video"] (from_bundle)

    @classmethod
    def from_bundle(cls, bundle: Bundle | str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, backbone: Mapping[str, Any] | None = None,
                    scheduler: Mapping[str, Any] | None = None) -> Pose2VideoPipeline:
        """Build from a bundle with stage-B components plus the base models it names.

        dtype: None = float32 on CPU, bfloat16 on CUDA. backbone: overrides ``base_models.video`` (e.g. SD-1.5
        elsewhere on this machine). scheduler: overrides the bundle's sampling scheduler config.
        """
        bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        bundle.require("reference_unet", "denoising_unet", "pose_guider", purpose="pose-to-video generation")
        settings = dict(bundle.settings.get("video", {}))
        backbone = backbone or bundle.base_models.get("video")
        if not backbone:
            raise AniPortraitError(f"bundle {bundle.path} names no base_models.video (VAE and image encoder); pass "
                                   "backbone={'kind': 'sd15', 'base_model': ..., 'image_encoder': ...}")
        vae, image_encoder, clip_image_processor = load_vae_and_image_encoder(backbone)
        pipeline = cls(vae, image_encoder, clip_image_processor, bundle.load("reference_unet"),
                       _load_denoising_unet(bundle), bundle.load("pose_guider"),
                       build_scheduler(scheduler or settings.get("scheduler")),
                       pose_scaling=settings.get("pose_scaling", "official_inference"))
        pipeline.video_settings = settings
        device = torch.device(device)
        return pipeline.to(device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32))

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

    @staticmethod
    def _resized(images: np.ndarray, height: int, width: int) -> np.ndarray:
        """(n, h, w, 3) -> (n, height, width, 3)."""
        if images.shape[1:3] == (height, width):
            return images
        interpolation = cv2.INTER_AREA if images.shape[1] > height else cv2.INTER_LINEAR
        return np.stack([cv2.resize(image, (width, height), interpolation=interpolation) for image in images])

    def _pose_tensor(self, pose_images: np.ndarray) -> torch.Tensor:
        """(n, H, W, 3) uint8 -> (1, 3, n, H, W) in the PoseGuider's input range and dtype."""
        pose = torch.from_numpy(np.ascontiguousarray(pose_images)).permute(3, 0, 1, 2).unsqueeze(0)
        return scale_pose_images(pose, self.pose_scaling).to(self.device, _module_dtype(self.pose_guider))

    # -- sampling -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        reference_image: np.ndarray,
        pose_images: np.ndarray,
        reference_pose: np.ndarray | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.5,
        context_frames: int = 16,
        context_overlap: int = 4,
        generator: torch.Generator | None = None,
        progress: bool = True,
        width: int | None = None,
        height: int | None = None,
        decode_batch_size: int = 8,
        eta: float = 0.0,
        cache_pose_features: bool = True,
        window_batch: int = 1,
    ) -> np.ndarray:
        """Generate one frame per pose image.

        reference_image: (H, W, 3) uint8 RGB portrait; pose_images: (T, H, W, 3) uint8; reference_pose: the
        reference's pose image (only a ``reference_attention: cross`` PoseGuider uses it). width x height:
        output size, multiples of 8 (default: the pose images'); inputs are resized to it.
        guidance_scale == 1 skips the unconditional pass. cache_pose_features: keep the PoseGuider's features of
        every window for all steps (about 4 MB per frame at 512 x 512 in bf16) instead of recomputing them.
        context_frames: the window length, or "auto" (the fewest windows of at most 32 frames; see context_windows).
        window_batch: windows denoised together in one UNet call (with both guidance halves): the same
        computation in fewer, larger launches (1: one window per call).
        Returns (T, height, width, 3) uint8.
        """
        reference_image = self._check_image("reference_image", reference_image, 3)
        pose_images = self._check_image("pose_images", pose_images, 4)
        height = int(height or pose_images.shape[1])
        width = int(width or pose_images.shape[2])
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise AniPortraitError(f"output size {width} x {height} must be a multiple of {self.vae_scale_factor} on "
                                   "both sides: pass width= and height= (e.g. 512), or resize the pose images")
        num_frames = len(pose_images)
        windows = context_windows(num_frames, context_frames, context_overlap)
        blend = self._blend_weights(windows, num_frames, context_overlap)
        guided = guidance_scale != 1.0
        device, unet_dtype = self.device, _module_dtype(self.denoising_unet)

        reference_image = self._resized(reference_image[None], height, width)[0]
        pose = self._pose_tensor(self._resized(pose_images, height, width))  # (1, 3, T, H, W)
        reference_pose_tensor = None
        if reference_pose is not None:
            reference_pose = self._check_image("reference_pose", reference_pose, 3)
            reference_pose_tensor = self._pose_tensor(self._resized(reference_pose[None], height, width))[:, :, 0]

        embeds = self._clip_embeds(reference_image)  # (1, 1, D)
        if guided:
            embeds = torch.cat([torch.zeros_like(embeds), embeds])  # (2, 1, D): [uncond; cond]
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = randn_tensor((1, self.denoising_unet.config.in_channels, num_frames, height // self.vae_scale_factor,
                                width // self.vae_scale_factor), generator=generator, device=device, dtype=torch.float32)
        latents = latents * self.scheduler.init_noise_sigma  # (1, 4, T, h, w)
        step_kwargs = self._step_kwargs(generator, eta)

        def features(window: slice) -> list[torch.Tensor]:
            return self.pose_guider(pose[:, :, window], reference_pose_tensor)  # 5 x (1, C, n, h, w)

        cached = [features(window) for window in windows] if cache_pose_features else None
        groups = self._window_groups(windows, window_batch)
        try:
            self._write_reference(reference_image, embeds[-1:])
            for timestep in tqdm(self.scheduler.timesteps, desc="denoising", disable=not progress):
                noise_pred = torch.zeros_like(latents)
                for group in groups:
                    count, length = len(group), windows[group[0]].stop - windows[group[0]].start
                    model_input = torch.cat([latents[:, :, windows[index]] for index in group])  # (k, 4, n, h, w)
                    pose_features = [torch.cat(parts) for parts in zip(*(
                        cached[index] if cached else features(windows[index]) for index in group))]
                    if guided:  # rows [uncond x k; cond x k]: both halves see the same latents and poses
                        model_input = torch.cat([model_input, model_input])
                        pose_features = [torch.cat([feature, feature]) for feature in pose_features]
                    self.reference_control.read(num_frames=length, uncond_mask=[True] * count + [False] * count
                                                if guided else None, cache_projections=True)
                    prediction = self.denoising_unet(
                        self.scheduler.scale_model_input(model_input, timestep).to(unet_dtype), timestep,
                        embeds.repeat_interleave(count, dim=0).to(unet_dtype), pose_cond_fea=pose_features,
                    ).sample.float()  # (k or 2k, 4, n, h, w)
                    if guided:
                        uncond, cond = prediction.chunk(2)
                        prediction = uncond + guidance_scale * (cond - uncond)
                    for row, index in enumerate(group):
                        noise_pred[:, :, windows[index]] += prediction[row : row + 1] * blend[index].to(device).view(
                            1, 1, -1, 1, 1)
                latents = self.scheduler.step(noise_pred, timestep, latents, **step_kwargs).prev_sample
        finally:
            self.reference_control.clear()
        return self._decode(latents, decode_batch_size)

    @staticmethod
    def _blend_weights(windows: list[slice], num_frames: int, context_overlap: int) -> list[torch.Tensor]:
        """Per window, its frames' weights normalised so the weights of every frame sum to 1 over windows."""
        raw = [window_weights(window.stop - window.start, context_overlap) for window in windows]
        total = torch.zeros(num_frames)
        for window, weights in zip(windows, raw):
            total[window] += weights
        return [weights / total[window] for window, weights in zip(windows, raw)]

    def _step_kwargs(self, generator: torch.Generator | None, eta: float) -> dict[str, Any]:
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        kwargs: dict[str, Any] = {}
        if "eta" in accepted:
            kwargs["eta"] = eta
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    def _clip_embeds(self, reference_image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, 1, D) CLIP image embedding."""
        pixels = self.clip_image_processor(images=reference_image, return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, _module_dtype(self.image_encoder))
        return self.image_encoder(pixels).image_embeds.unsqueeze(1)

    @staticmethod
    def _window_groups(windows: list[slice], window_batch: int) -> list[list[int]]:
        """Window indices in groups of at most ``window_batch`` windows of equal length (one UNet call each)."""
        if window_batch < 1:
            raise AniPortraitError(f"window_batch={window_batch}: need at least 1 window per UNet call")
        groups: list[list[int]] = []
        for index, window in enumerate(windows):
            length = window.stop - window.start
            last = groups[-1] if groups else None
            if last and len(last) < window_batch and windows[last[0]].stop - windows[last[0]].start == length:
                last.append(index)
            else:
                groups.append([index])
        return groups

    def _write_reference(self, reference_image: np.ndarray, cond_embeds: torch.Tensor) -> None:
        """Fill the reference bank once (ReferenceNet at timestep 0 on the VAE mean); every UNet call reads it."""
        image = torch.from_numpy(np.ascontiguousarray(reference_image)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        image = image.to(self.device, _module_dtype(self.vae))
        latents = self.vae.encode(image).latent_dist.mean * self.vae.config.scaling_factor  # (1, 4, h, w)
        self.reference_control.write()
        self.reference_unet(latents.to(_module_dtype(self.reference_unet)), 0,
                            cond_embeds.to(_module_dtype(self.reference_unet)))

    def _decode(self, latents: torch.Tensor, batch_size: int) -> np.ndarray:
        """(1, 4, T, h, w) latents -> (T, H, W, 3) uint8, ``batch_size`` frames per VAE call."""
        frames = latents[0].transpose(0, 1) / self.vae.config.scaling_factor  # (T, 4, h, w)
        dtype = _module_dtype(self.vae)
        decoded = []
        for start in range(0, len(frames), max(1, batch_size)):
            images = self.vae.decode(frames[start : start + batch_size].to(dtype)).sample.float()  # (k, 3, H, W)
            images = ((images + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
            decoded.append(images.permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(decoded)
