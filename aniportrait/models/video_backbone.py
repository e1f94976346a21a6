"""Build the landmark-to-video models from a ``backbone`` config.

``kind: sd15`` loads pretrained weights (local directories or hub ids)::

    kind: sd15
    base_model: runwayml/stable-diffusion-v1-5          # SD-1.5 with a unet/ subfolder
    vae: stabilityai/sd-vae-ft-mse                      # optional; default base_model's vae/
    image_encoder: lambdalabs/sd-image-variations-diffusers
    image_encoder_subfolder: image_encoder              # optional; local dirs are detected
    motion_module: null                                 # official motion_module.pth / mm_sd_v15_v2.ckpt
    local_files_only: false

``kind: tiny`` and ``kind: small`` build the same architectures (SD-1.5's block layout: the same classes and
key layout) at reduced widths and depth, randomly initialised (seeded), with no pretrained weights anywhere:

* tiny: 4-level UNets of widths (32, 64, 128, 128), one layer per block, a VAE of widths (32, 32, 64, 64), a
  2-layer CLIP vision tower on 32 px images; 64 x 64 frames. Tests and the CPU quickstart.
* small: UNets of widths (64, 128, 256, 256), one layer per block, a VAE of widths (64, 128, 256, 256), a
  4-layer CLIP vision tower on 64 px images; 256 x 256 frames (128 works too). Learns in minutes on one GPU
  (benchmarks/stage_b_learning.py).

In both, the ReferenceNet and the denoising UNet start from one random 2-D UNet (the same weights), as both start
from SD-1.5 in the official training.

Both VAEs downsample by 8, as SD's, so the PoseGuider's features fit as with SD-1.5. A random VAE reconstructs
nothing, so these backbones get theirs from ``model=vae`` (:mod:`aniportrait.training.vae`, run first by
``model=all``): the config key ``vae`` names the trained one (a bundle folder with a ``vae`` component, or a
diffusers AutoencoderKL folder; :func:`aniportrait.bundle.load_vae` reads it and the caller passes it in);
null means the seeded random VAE, which ``require_trained_vae: true`` (backbone=small) refuses for stage-B
training. The CLIP image encoder stays random and frozen: a fixed random projection of the
reference (the ReferenceNet carries its appearance).

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
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from aniportrait.errors import AniPortraitError
from aniportrait.models.checkpoints import load_state_dict_checked
from aniportrait.models.pose_guider import PoseGuider
from aniportrait.models.reference_unet import SD_OUTPUT_HEAD, ReferenceNet
from aniportrait.models.unet3d import UNet3DConditionModel

__all__ = ["VideoModels", "build_video_models", "build_frozen_encoders", "RANDOM_BACKBONES",
           "RandomBackbone", "TINY_UNET_CONFIG", "TINY_VAE_CONFIG", "TINY_CLIP_CONFIG", "SMALL_UNET_CONFIG",
           "SMALL_VAE_CONFIG", "SMALL_CLIP_CONFIG"]

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
# backbone=small: the tiny layout at twice its widths (the VAE at up to four times), 256 px frames
SMALL_UNET_CONFIG: dict[str, Any] = {
    **TINY_UNET_CONFIG,
    "sample_size": 32,
    "block_out_channels": (64, 128, 256, 256),
    "cross_attention_dim": 256,
    "attention_head_dim": 4,  # diffusers' legacy name: 4 heads per attention layer (head sizes 16..64)
}
SMALL_VAE_CONFIG: dict[str, Any] = {**TINY_VAE_CONFIG, "block_out_channels": (64, 128, 256, 256), "sample_size": 256}
SMALL_CLIP_CONFIG: dict[str, Any] = {
    **TINY_CLIP_CONFIG,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "image_size": 64,
    "projection_dim": 256,
}
_SMALL_POSE_GUIDER = {"attention_num_heads": 4, "attention_head_dim": 16}


@dataclass(frozen=True)
class RandomBackbone:
    """The configs of a random-init backbone kind."""

    unet: Mapping[str, Any]
    vae: Mapping[str, Any]
    clip: Mapping[str, Any]
    pose_guider: Mapping[str, Any]


RANDOM_BACKBONES: dict[str, RandomBackbone] = {
    "tiny": RandomBackbone(TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_CLIP_CONFIG, _TINY_POSE_GUIDER),
    "small": RandomBackbone(SMALL_UNET_CONFIG, SMALL_VAE_CONFIG, SMALL_CLIP_CONFIG, _SMALL_POSE_GUIDER),
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@dataclass
class VideoModels:
    """Everything stage B needs: VAE, CLIP image encoder (+ its preprocessing), both UNets, PoseGuider.

    ``vae_trained``: the VAE holds trained weights (pretrained, or fitted by ``model=vae``), not a random init.
    """

    vae: AutoencoderKL
    image_encoder: CLIPVisionModelWithProjection
    clip_image_processor: CLIPImageProcessor
    reference_unet: ReferenceNet
    denoising_unet: UNet3DConditionModel
    pose_guider: PoseGuider
    vae_trained: bool = True


def build_video_models(
    backbone: Mapping[str, Any],
    use_motion_module: bool = True,
    motion_module_kwargs: Mapping[str, Any] | None = None,
    pose_guider_kwargs: Mapping[str, Any] | None = None,
    vae: AutoencoderKL | None = None,
) -> VideoModels:
    """Build the models for ``backbone`` (``kind: sd15``, ``tiny`` or ``small``, see the module docstring).

    use_motion_module: False for stage 1 (the denoising UNet then has the official stage-1 keys).
    motion_module_kwargs: VanillaTemporalModule arguments (default: official inference_v2.yaml).
    pose_guider_kwargs: PoseGuider arguments besides ``noise_latent_channels`` (e.g. ``reference_attention``).
    vae: a trained VAE for a random-init kind (``model=vae``'s; see :func:`aniportrait.bundle.load_vae`), used
    instead of the seeded random one.
    """
    kind = backbone.get("kind")
    if kind in RANDOM_BACKBONES:
        return _build_random(backbone, use_motion_module, motion_module_kwargs, pose_guider_kwargs, vae)
    if kind == "sd15":
        return _build_sd15(backbone, use_motion_module, motion_module_kwargs, pose_guider_kwargs)
    raise AniPortraitError(f"backbone.kind={kind!r} is unknown: expected 'sd15' (pretrained) or one of "
                           f"{sorted(RANDOM_BACKBONES)} (random init)")


def _random_kind(backbone: Mapping[str, Any]) -> RandomBackbone:
    kind = backbone.get("kind")
    if kind not in RANDOM_BACKBONES:
        raise AniPortraitError(f"backbone.kind={kind!r}: expected one of {sorted(RANDOM_BACKBONES)}")
    return RANDOM_BACKBONES[kind]


def _clip_processor(configs: RandomBackbone) -> CLIPImageProcessor:
    size = configs.clip["image_size"]
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def build_frozen_encoders(backbone: Mapping[str, Any]) -> tuple[AutoencoderKL, CLIPVisionModelWithProjection,
                                                                 CLIPImageProcessor]:
    """The seeded random VAE, CLIP image encoder and its processor of a random-init backbone kind (the same
    weights :func:`build_video_models` gives them), without building the UNets."""
    configs = _random_kind(backbone)
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's random state
        torch.manual_seed(int(backbone.get("seed", 0)))
        vae, image_encoder = _seeded_encoders(configs)
    return vae.eval(), image_encoder.eval(), _clip_processor(configs)


def _seeded_encoders(configs: RandomBackbone) -> tuple[AutoencoderKL, CLIPVisionModelWithProjection]:
    """The first draws after the backbone's seed (so the UNets that follow keep their weights either way)."""
    return AutoencoderKL(**configs.vae), CLIPVisionModelWithProjection(CLIPVisionConfig(**configs.clip))


def _build_random(backbone: Mapping[str, Any], use_motion_module: bool,
                  motion_module_kwargs: Mapping[str, Any] | None,
                  pose_guider_kwargs: Mapping[str, Any] | None, vae: AutoencoderKL | None) -> VideoModels:
    configs = _random_kind(backbone)
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's random state
        torch.manual_seed(int(backbone.get("seed", 0)))
        random_vae, image_encoder = _seeded_encoders(configs)
        # One random 2-D UNet plays SD-1.5's: both UNets start from it, as both start from SD-1.5 in the official
        # training. At the first step the ReferenceNet's tokens then live in the denoising UNet's own feature space,
        # so reference attention can match a target's features to the reference's; two independent draws would
        # leave that path to be learned from nothing (and memorising appearance in the weights is cheaper).
        base = UNet2DConditionModel(**configs.unet)
        reference_unet = ReferenceNet(**configs.unet)
        load_state_dict_checked(reference_unet, base.state_dict(), "ReferenceNet (the backbone's 2-D UNet)",
                                allow_unexpected=SD_OUTPUT_HEAD)
        denoising_unet = UNet3DConditionModel.from_unet2d(base, motion_module_kwargs,
                                                           use_motion_module=use_motion_module)
        pose_guider = PoseGuider(noise_latent_channels=configs.unet["block_out_channels"][0],
                                 **{**configs.pose_guider, **(pose_guider_kwargs or {})})
    return VideoModels(vae if vae is not None else random_vae, image_encoder.eval(), _clip_processor(configs),
                       reference_unet, denoising_unet, pose_guider, vae_trained=vae is not None)


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
