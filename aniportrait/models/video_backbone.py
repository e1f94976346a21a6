"""Build the landmark-to-video models from a ``backbone`` config.

``kind: sd15`` loads pretrained weights (local directories or hub ids)::

    kind: sd15
    base_model: runwayml/stable-diffusion-v1-5          # SD-1.5 with a unet/ subfolder
    vae: stabilityai/sd-vae-ft-mse                      # optional; default base_model's vae/
    image_encoder: lambdalabs/sd-image-variations-diffusers
    image_encoder_subfolder: image_encoder              # optional; local dirs are detected
    motion_module: null                                 # official motion_module.pth / mm_sd_v15_v2.ckpt
    local_files_only: false

``kind: tiny`` builds the same architectures small and randomly initialised (seeded) for tests and the
CPU quickstart: 4-level UNets of widths (32, 64, 128, 128) so the PoseGuider's features fit as with
SD-1.5, a 4-level VAE (downsampling 8, as SD's), a 2-layer CLIP vision tower on 32x32 images.

A missing or unusable path raises :class:`AniPortraitError` naming the config key and what the directory
must contain; nothing falls back silently.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from aniportrait.errors import AniPortraitError
from aniportrait.models.pose_guider import PoseGuider
from aniportrait.models.reference_unet import ReferenceNet
from aniportrait.models.unet3d import UNet3DConditionModel

__all__ = ["VideoModels", "build_video_models", "TINY_UNET_CONFIG", "TINY_VAE_CONFIG", "TINY_CLIP_CONFIG"]

TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64, 128, 128),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
    "norm_num_groups": 32,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (32, 32, 64, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
}
TINY_CLIP_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
}
_TINY_POSE_GUIDER = {"attention_num_heads": 2, "attention_head_dim": 16}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@dataclass
class VideoModels:
    """Everything stage B needs: VAE, CLIP image encoder (+ its preprocessing), both UNets, PoseGuider."""

    vae: AutoencoderKL
    image_encoder: CLIPVisionModelWithProjection
    clip_image_processor: CLIPImageProcessor
    reference_unet: ReferenceNet
    denoising_unet: UNet3DConditionModel
    pose_guider: PoseGuider


def build_video_models(
    backbone: Mapping[str, Any],
    use_motion_module: bool = True,
    motion_module_kwargs: Mapping[str, Any] | None = None,
    pose_guider_kwargs: Mapping[str, Any] | None = None,
) -> VideoModels:
    """Build the models for ``backbone`` (``kind: sd15`` or ``kind: tiny``, see the module docstring).

    use_motion_module: False for stage 1 (the denoising UNet then has the official stage-1 keys).
    motion_module_kwargs: VanillaTemporalModule arguments (default: official inference_v2.yaml).
    pose_guider_kwargs: PoseGuider arguments besides ``noise_latent_channels`` (e.g. ``reference_attention``).
    """
    kind = backbone.get("kind")
    if kind == "tiny":
        return _build_tiny(int(backbone.get("seed", 0)), use_motion_module, motion_module_kwargs, pose_guider_kwargs)
    if kind == "sd15":
        return _build_sd15(backbone, use_motion_module, motion_module_kwargs, pose_guider_kwargs)
    raise AniPortraitError(f"backbone.kind={kind!r} is unknown: expected 'sd15' (pretrained) or 'tiny' (random init)")


def _build_tiny(seed: int, use_motion_module: bool, motion_module_kwargs: Mapping[str, Any] | None,
                pose_guider_kwargs: Mapping[str, Any] | None) -> VideoModels:
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's random state
        torch.manual_seed(seed)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_CONFIG))
        reference_unet = ReferenceNet(**TINY_UNET_CONFIG)
        denoising_unet = UNet3DConditionModel.from_unet2d_config(
            TINY_UNET_CONFIG, motion_module_kwargs, use_motion_module=use_motion_module)
        pose_guider = PoseGuider(noise_latent_channels=TINY_UNET_CONFIG["block_out_channels"][0],
                                 **{**_TINY_POSE_GUIDER, **(pose_guider_kwargs or {})})
    size = TINY_CLIP_CONFIG["image_size"]
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return VideoModels(vae, image_encoder.eval(), processor, reference_unet, denoising_unet, pose_guider)


def _build_sd15(backbone: Mapping[str, Any], use_motion_module: bool, motion_module_kwargs: Mapping[str, Any] | None,
                pose_guider_kwargs: Mapping[str, Any] | None) -> VideoModels:
    local_only = bool(backbone.get("local_files_only", False))
    base = _source(backbone, "base_model", "unet", _DIFFUSERS_WEIGHTS, "SD-1.5: unet/config.json and unet/{weights}")
    vae_key = "vae" if backbone.get("vae") else "base_model"
    vae = _source(backbone, vae_key, None if vae_key == "vae" else "vae", _DIFFUSERS_WEIGHTS,
                  "an AutoencoderKL: config.json and {weights} (e.g. stabilityai/sd-vae-ft-mse)")
    encoder = _source(backbone, "image_encoder", backbone.get("image_encoder_subfolder"), _TRANSFORMERS_WEIGHTS,
                      "a CLIPVisionModelWithProjection: config.json and {weights}, at its root or in image_encoder/")
    motion_module = backbone.get("motion_module")
    if motion_module and not Path(motion_module).is_file():
        raise AniPortraitError(
            f"backbone.motion_module={motion_module!r} is not a file: give the path of motion_module.pth, "
            "mm_sd_v15_v2.ckpt or a motion-module .safetensors (or null for freshly initialised modules)"
        )

    with _naming(base, local_only):
        reference_unet = ReferenceNet.from_pretrained(base.location, subfolder=base.subfolder,
                                                      local_files_only=local_only)
        denoising_unet = UNet3DConditionModel.from_pretrained_2d(
            base.location, motion_module_path=motion_module or None, subfolder=base.subfolder,
            motion_module_kwargs=motion_module_kwargs, use_motion_module=use_motion_module,
            local_files_only=local_only,
        )
    with _naming(vae, local_only):
        vae_model = AutoencoderKL.from_pretrained(vae.location, subfolder=vae.subfolder, local_files_only=local_only)
    with _naming(encoder, local_only):
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            encoder.location, subfolder=encoder.subfolder or "", local_files_only=local_only)
    pose_guider = PoseGuider(noise_latent_channels=denoising_unet.config.block_out_channels[0],
                             **(pose_guider_kwargs or {}))
    # the official pipeline and dataset use CLIPImageProcessor() defaults (224 px, OpenAI CLIP mean/std)
    return VideoModels(vae_model, image_encoder.eval(), CLIPImageProcessor(), reference_unet, denoising_unet,
                       pose_guider)


@dataclass(frozen=True)
class _Source:
    key: str
    location: str
    subfolder: str | None
    contents: str  # what the directory must contain, for error messages


def _source(backbone: Mapping[str, Any], key: str, subfolder: str | None, weights: tuple[str, ...],
            contents: str) -> _Source:
    """Check a local directory (or accept a hub id) for ``backbone.<key>``; detect an image_encoder/ subfolder."""
    contents = contents.format(weights=" or ".join(weights))
    value = backbone.get(key)
    if not value:
        raise AniPortraitError(f"backbone.{key} is not set: give a local directory or hub id holding {contents}")
    location = str(value)
    path = Path(location).expanduser()
    if not path.exists():
        if _HUB_ID.match(location):
            return _Source(key, location, subfolder, contents)
        raise AniPortraitError(f"backbone.{key}={location!r}: no such directory; it must hold {contents}")
    if key == "image_encoder" and subfolder is None and not (path / "config.json").is_file():
        subfolder = "image_encoder"
    folder = path / subfolder if subfolder else path
    if not (folder / "config.json").is_file() or not any((folder / name).is_file() for name in weights):
        raise AniPortraitError(f"backbone.{key}={location!r}: {folder} lacks the files of {contents}")
    return _Source(key, str(path), subfolder, contents)


@contextlib.contextmanager
def _naming(source: _Source, local_only: bool) -> Iterator[None]:
    """Turn a loader's OSError (offline, not cached, no such hub repo) into one AniPortraitError naming the key."""
    try:
        yield
    except OSError as error:
        where = source.location + (f" (subfolder {source.subfolder})" if source.subfolder else "")
        hint = " with local_files_only set (only cached hub models are used)" if local_only else ""
        raise AniPortraitError(
            f"backbone.{source.key}: could not load {where}{hint}: {error}. "
            f"Point it at a directory or hub id holding {source.contents}"
        ) from error
