"""Stage-B training samples: video frames, their pose images and a reference frame, built on the fly from clips.

A sample holds ``f = n_sample_frames`` target frames (1 in stage 1; 16 in stage 2, ``sample_rate`` frames
apart) and a reference frame drawn at random from the same clip, as the official ``FaceDataset`` does:

    pixel_values     (f, 3, H, W)  float32  target frames in [-1, 1]
    pose_images      (f, 3, H, W)  float32  the targets' landmarks drawn as pose images (official look), scaled
    reference_image  (3, H, W)     float32  the reference frame in [-1, 1]
    reference_pose   (3, H, W)     float32  its pose image, scaled like ``pose_images``
    clip_image       (3, S, S)     float32  the reference frame through the CLIP image processor (S: its crop size)
    sample_index     ()            int64    the sample's number (the training step seeds its noise with it)
    clip_index       ()            int64    which clip of the split
    frame_indices    (f,)          int64    which frames of the clip
    reference_frame  ()            int64

Pose images are drawn from the clip's ``lmks`` with :func:`aniportrait.face.drawing.draw_landmarks` at the
output size and scaled by ``pose_scaling`` ("unit", [-1, 1], as official training feeds them).
Augmentation (training only): one random crop of ``crop_scale`` times the largest crop with the output's aspect
ratio, shared by the targets, their poses and the reference (landmarks are mapped through the same crop), an
optional horizontal flip (off by default: a flipped pose image shows the left-eye colour on the right), and an
optional colour jitter (``color_jitter``: brightness, contrast, saturation, hue, as torchvision's ColorJitter) drawn
once per sample and applied alike to the targets, the reference and its CLIP pixels, never to the pose images. With
few identities it keeps the model from memorising their colours: the colours of the target can then only come from
the reference, so the reference path has to learn (benchmarks/stage_b_learning.py).

Every sample is a pure function of ``(seed, index)``, so the same index always gives the same sample, runs are
reproducible, and ranks that draw disjoint indices shard cleanly. :class:`ResumableBatchLoader` numbers the
training samples by step, so a resumed run continues with the batch an uninterrupted run would have seen.

Precomputed latents (``latent_cache: true``, as MosaicML's precomputed latents): the frozen VAE's posterior and
the CLIP embedding of every frame, computed once per clip by :mod:`aniportrait.training.latent_cache` into
``<clip dir>/latents_<W>x<H>.safetensors`` (``mean``, ``std`` (T, 4, h, w), ``clip_embeds`` (T, D)). A sample then
holds ``latent_mean`` / ``latent_std`` (f, 4, h, w), ``reference_latent_mean`` / ``reference_latent_std``
(4, h, w) and ``clip_embeds`` (D,) in place of ``pixel_values``, ``reference_image`` and ``clip_image``: no video
is decoded, and the step draws the latents from the same posterior. The cache holds centre crops, so it cannot be
combined with the random crop, flip or colour jitter.

Clips shorter than ``(n_sample_frames - 1) * min(sample_rate) + 1`` frames are skipped with a logged count.
Random access into H.264 decodes from the previous keyframe: datasets prepared with short GOPs load much faster,
and ``frame_cache_clips`` keeps that many whole decoded clips per loader process (small datasets on fast GPUs:
every clip decoded once). ``conditioning: false`` leaves out pose images and CLIP pixels (``model=vae`` trains
on the frames alone).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from transformers import CLIPImageProcessor

from aniportrait.data.clip import ClipRecord, Manifest
from aniportrait.errors import AniPortraitError
from aniportrait.face.drawing import draw_landmarks
from aniportrait.models.pose_image_scaling import POSE_IMAGE_SCALINGS, scale_pose_images
from aniportrait.utils.files import read_arrays
from aniportrait.utils.pixels import to_signed_unit

__all__ = ["FrameSettings", "VideoFrameDataset", "ResumableBatchLoader", "VideoFrameDataModule", "latent_cache_name"]

log = logging.getLogger(__name__)


def latent_cache_name(width: int, height: int) -> str:
    """The file a clip's precomputed latents at ``width`` x ``height`` live in, in the clip's folder."""
    return f"latents_{int(width)}x{int(height)}.safetensors"


@dataclass(frozen=True)
class FrameSettings:
    """How samples are cut from clips (shared by the datasets of a datamodule)."""

    n_sample_frames: int = 1
    sample_rates: tuple[int, ...] = (1,)  # one is chosen per sample (official stage 2: 1 or 4)
    width: int = 512
    height: int = 512
    pose_scaling: str = "unit"
    crop_scale: tuple[float, float] = (1.0, 1.0)
    horizontal_flip: float = 0.0
    color_jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue

    def __post_init__(self) -> None:
        if self.n_sample_frames < 1:
            raise AniPortraitError(f"n_sample_frames={self.n_sample_frames}: need at least 1 frame per sample")
        if not self.sample_rates or min(self.sample_rates) < 1:
            raise AniPortraitError(f"sample_rate={list(self.sample_rates)}: give positive frame strides, e.g. 4 or [1, 4]")
        if self.width % 8 or self.height % 8 or self.width <= 0 or self.height <= 0:
            raise AniPortraitError(f"width x height = {self.width} x {self.height}: both must be positive multiples "
                                   "of 8 (the VAE downsamples by 8)")
        if self.pose_scaling not in POSE_IMAGE_SCALINGS:
            raise AniPortraitError(f"pose_scaling={self.pose_scaling!r}: expected one of {POSE_IMAGE_SCALINGS}")
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise AniPortraitError(f"crop_scale={list(self.crop_scale)}: expected [min, max] with 0 < min <= max <= 1")
        if not 0.0 <= self.horizontal_flip <= 1.0:
            raise AniPortraitError(f"horizontal_flip={self.horizontal_flip}: a probability in [0, 1]")
        jitter = self.color_jitter
        if len(jitter) != 4 or min(jitter) < 0 or max(jitter[:3]) >= 1 or jitter[3] > 0.5:
            raise AniPortraitError(f"color_jitter={list(jitter)}: expected [brightness, contrast, saturation, hue], "
                                   "the first three in [0, 1) (factors drawn from [1 - v, 1 + v]) and hue in [0, 0.5]")

    @property
    def min_clip_frames(self) -> int:
        """Frames a clip needs to yield a sample at the smallest stride."""
        return (self.n_sample_frames - 1) * min(self.sample_rates) + 1


@dataclass(frozen=True)
class _Draw:
    """Everything random about one sample."""

    clip_index: int
    frame_indices: np.ndarray  # (f,)
    reference_frame: int
    crop_draw: np.ndarray | None  # 3 uniforms (scale, y, x) of a random crop; None = centred, largest
    flip: bool
    color: np.ndarray | None = None  # (brightness, contrast, saturation factors, hue shift); None = unchanged


class VideoFrameDataset(Dataset):
    """Samples from the clips of one split.

    ``random_clips``: each index draws its clip at random (training; ``length`` samples per epoch, but any
    non-negative index is valid); otherwise index ``i`` uses clip ``i % clips`` (validation: a fixed set).
    ``augment`` switches the random crop, flip and colour jitter on.
    """

    def __init__(self, root: str | Path, records: Sequence[ClipRecord], settings: FrameSettings,
                 clip_image_processor: CLIPImageProcessor, split: str = "train", random_clips: bool = True,
                 augment: bool = True, length: int = 10_000, seed: int = 0, cache_clips: int = 8,
                 frame_cache_clips: int = 0, conditioning: bool = True, latent_cache: bool = False):
        self.root, self.settings, self.split = Path(root), settings, split
        self.augment, self.conditioning = augment, bool(conditioning)
        self.latent_cache = bool(latent_cache)
        blocker = self.latent_cache_blocker()
        if self.latent_cache and blocker:
            raise AniPortraitError(f"model.loader.latent_cache=true: {blocker}")
        self.clip_image_processor = clip_image_processor
        self.random_clips, self.augment, self.length, self.seed = random_clips, augment, int(length), int(seed)
        need = settings.min_clip_frames
        self.records = [record for record in records if record.frames >= need]
        self.skipped_clips = [record.id for record in records if record.frames < need]
        if self.skipped_clips:
            log.warning(
                "%s: skipped %d of %d %s clips shorter than %d frames (n_sample_frames=%d, sample_rate=%d): %s",
                self.root, len(self.skipped_clips), len(records), split, need, settings.n_sample_frames,
                min(settings.sample_rates), ", ".join(self.skipped_clips[:8]) + (" ..." if len(self.skipped_clips) > 8 else ""),
            )
        if not self.records:
            raise AniPortraitError(
                f"{self.root}: none of the {len(records)} {split} clips has the {need} frames a sample needs "
                f"(n_sample_frames={settings.n_sample_frames} x sample_rate={min(settings.sample_rates)}); "
                "lower model.loader.n_sample_frames / sample_rate or use longer clips"
            )
        self._cache_size = cache_clips
        self.frame_cache_clips = int(frame_cache_clips)
        self._decoded: OrderedDict[int, np.ndarray] = OrderedDict()  # whole clips (frame_cache_clips > 0)
        self._landmarks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._readers: OrderedDict[int, Any] = OrderedDict()  # decord readers of this process
        self._readers_pid = os.getpid()
        self._inherited_readers: list[Any] = []

    def __getstate__(self) -> dict[str, Any]:
        """Workers started by spawn get no readers (they cannot be pickled); each process opens its own."""
        return {**self.__dict__, "_readers": OrderedDict(), "_inherited_readers": []}

    def __len__(self) -> int:
        return self.length if self.random_clips else len(self.records)

    # -- clip access (cached per worker) -------------------------------------------------------------------

    def _cached(self, cache: OrderedDict, index: int, load, size: int | None = None) -> Any:
        if index in cache:
            cache.move_to_end(index)
            return cache[index]
        cache[index] = value = load()
        if len(cache) > (self._cache_size if size is None else size):
            cache.popitem(last=False)
        return value

    def landmarks(self, clip_index: int) -> tuple[np.ndarray, np.ndarray]:
        """The clip's normalised landmarks (T, 478, 3) and valid flags (T,); only these arrays are read."""
        record = self.records[clip_index]

        def load() -> tuple[np.ndarray, np.ndarray]:
            path = self.root / record.landmarks
            arrays = read_arrays(path, f"landmarks of clip {record.id}", keys=("lmks", "valid"), finite=("lmks",))
            lmks, valid = arrays["lmks"], arrays["valid"]
            if lmks.ndim != 3 or lmks.shape[1:] != (478, 3) or len(lmks) != record.frames or valid.shape != (record.frames,):
                raise AniPortraitError(
                    f"clip {record.id}: {path} has lmks {lmks.shape} and valid {valid.shape}; the manifest says "
                    f"{record.frames} frames, so expected ({record.frames}, 478, 3) and ({record.frames},)"
                )
            return lmks, valid.astype(bool)

        # landmarks are small: keep those of every clip whose frames are cached (else they are re-read per sample)
        return self._cached(self._landmarks, clip_index, load, size=max(self._cache_size, self.frame_cache_clips))

    def read_frames(self, clip_index: int, indices: np.ndarray) -> np.ndarray:
        """RGB uint8 frames (n, h, w, 3) of the clip; one decode pass over the sorted unique indices (or the whole
        clip, once, with ``frame_cache_clips``)."""
        if self.frame_cache_clips > 0:
            frames = self._cached(self._decoded, clip_index,
                                  lambda: self._decode(clip_index, np.arange(self.records[clip_index].frames)),
                                  size=self.frame_cache_clips)
            return frames[np.asarray(indices)]
        return self._decode(clip_index, np.asarray(indices))

    def _decode(self, clip_index: int, indices: np.ndarray) -> np.ndarray:
        import decord

        record = self.records[clip_index]
        path = self.root / record.video

        def load():
            try:
                return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
            except Exception as error:  # noqa: BLE001 - decord raises DECORDError and RuntimeError
                raise AniPortraitError(f"clip {record.id}: cannot open {path} ({error}); the file is corrupt") from error

        if self._readers_pid != os.getpid():
            # A forked worker: inherited readers share file offsets with the parent, and destroying one joins decoder
            # threads that exist only there (an abort). Keep them, unused; workers end with os._exit.
            self._inherited_readers.extend(self._readers.values())
            self._readers, self._readers_pid = OrderedDict(), os.getpid()
        reader = self._cached(self._readers, clip_index, load)
        unique, inverse = np.unique(indices, return_inverse=True)
        if unique[-1] >= len(reader):
            raise AniPortraitError(f"clip {record.id}: {path} has {len(reader)} frames but the manifest says "
                                   f"{record.frames}; re-run the preparation for this clip")
        try:
            frames = reader.get_batch(unique.tolist()).asnumpy()
        except Exception as error:  # noqa: BLE001
            raise AniPortraitError(f"clip {record.id}: cannot decode {path} ({error}); the file is corrupt") from error
        return frames[inverse]

    # -- sampling ------------------------------------------------------------------------------------------

    def _draw(self, index: int) -> _Draw:
        rng = np.random.default_rng((self.seed, index))
        clip_index = int(rng.integers(len(self.records))) if self.random_clips else index % len(self.records)
        record = self.records[clip_index]
        _, valid = self.landmarks(clip_index)
        with_face = np.flatnonzero(valid) if valid.any() else np.arange(record.frames)
        settings = self.settings
        rates = [rate for rate in settings.sample_rates if (settings.n_sample_frames - 1) * rate < record.frames]
        rate = rates[int(rng.integers(len(rates)))]
        if settings.n_sample_frames == 1:
            frame_indices = np.array([with_face[int(rng.integers(len(with_face)))]])
        else:
            span = (settings.n_sample_frames - 1) * rate + 1
            start = int(rng.integers(record.frames - span + 1))
            frame_indices = start + rate * np.arange(settings.n_sample_frames)
        reference_frame = int(with_face[int(rng.integers(len(with_face)))])
        crop_draw, flip_draw = rng.random(3), rng.random()  # drawn even when unused: the other draws stay put
        crops = self.augment and settings.crop_scale != (1.0, 1.0)
        flip = self.augment and flip_draw < settings.horizontal_flip
        color = None
        if self.augment and any(settings.color_jitter):
            spread = np.asarray(settings.color_jitter)
            color = np.concatenate([1.0 + spread[:3] * rng.uniform(-1, 1, 3), spread[3:] * rng.uniform(-1, 1, 1)])
        return _Draw(clip_index, frame_indices.astype(np.int64), reference_frame, crop_draw if crops else None, flip,
                     color)

    def _largest_crop(self, source_height: int, source_width: int) -> tuple[float, float]:
        """(height, width) of the largest crop with the output's aspect ratio."""
        aspect = self.settings.width / self.settings.height
        width = min(float(source_width), source_height * aspect)
        return width / aspect, width

    def _crop_box(self, source_height: int, source_width: int, draw: np.ndarray) -> tuple[int, int, int, int]:
        """(y0, x0, height, width) of a random crop: ``crop_scale`` times the largest, anywhere in the frame."""
        low, high = self.settings.crop_scale
        full_height, full_width = self._largest_crop(source_height, source_width)
        scale = low + (high - low) * draw[0]
        height, width = max(1, round(full_height * scale)), max(1, round(full_width * scale))
        y0 = int(draw[1] * (source_height - height + 1))
        x0 = int(draw[2] * (source_width - width + 1))
        return y0, x0, height, width

    def _centre_box(self, source_height: int, source_width: int) -> tuple[int, int, int, int]:
        full_height, full_width = self._largest_crop(source_height, source_width)
        height, width = round(full_height), round(full_width)
        return (source_height - height) // 2, (source_width - width) // 2, height, width

    def _images(self, frames: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """Crop (n, h, w, 3) frames to ``box`` and resize them to the output size."""
        y0, x0, height, width = box
        size = (self.settings.width, self.settings.height)
        crops = frames[:, y0 : y0 + height, x0 : x0 + width]
        if crops.shape[1:3] == (self.settings.height, self.settings.width):
            return np.ascontiguousarray(crops)
        shrink = height > self.settings.height
        interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        return np.stack([cv2.resize(crop, size, interpolation=interpolation) for crop in crops])

    @staticmethod
    def _jitter(images: np.ndarray, color: np.ndarray) -> np.ndarray:
        """(n, H, W, 3) uint8 RGB through one colour change: brightness, contrast (about each image's mean grey),
        saturation factors, then a hue shift (a fraction of the colour wheel), as torchvision's ColorJitter."""
        brightness, contrast, saturation, hue = color
        luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        out = np.clip(images.astype(np.float32) * brightness, 0, 255)  # each step clamped, as torchvision
        mean = (out @ luma).mean(axis=(1, 2))[:, None, None, None]
        out = np.clip((out - mean) * contrast + mean, 0, 255)
        grey = (out @ luma)[..., None]
        out = np.rint(np.clip(grey + (out - grey) * saturation, 0, 255)).astype(np.uint8)
        if hue:
            shift = int(round(hue * 180))  # OpenCV's 8-bit hue runs 0..179
            for index, image in enumerate(out):
                hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
                hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
                out[index] = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        return out

    def _poses(self, lmks: np.ndarray, box: tuple[int, int, int, int], source_size: tuple[int, int]) -> np.ndarray:
        """Pose images (n, H, W, 3) uint8 of normalised landmarks (n, 478, 3), seen through the crop ``box``."""
        y0, x0, height, width = box
        source_height, source_width = source_size
        xy = lmks[..., :2].astype(np.float64) * np.array([source_width, source_height])
        xy = (xy - np.array([x0, y0])) / np.array([width, height])  # normalised to the crop
        size = (self.settings.height, self.settings.width)
        return np.stack([draw_landmarks(points, image_size=size, normalized=True) for points in xy])

    def latent_cache_blocker(self) -> str | None:
        """Why this dataset's samples cannot come from precomputed latents (None: they can)."""
        settings = self.settings
        if self.augment and (settings.crop_scale != (1.0, 1.0) or settings.horizontal_flip or any(settings.color_jitter)):
            return (f"the cache holds centre crops of the frames; it cannot be combined with "
                    f"crop_scale={list(settings.crop_scale)}, horizontal_flip={settings.horizontal_flip} or "
                    f"color_jitter={list(settings.color_jitter)}: switch those off or set latent_cache=false")
        if not self.conditioning:
            return "it is for stage B (conditioning: true); model=vae trains on the frames themselves"
        return None

    def latent_cache_path(self, clip_index: int) -> Path:
        record = self.records[clip_index]
        return self.root / Path(record.video).parent / latent_cache_name(self.settings.width, self.settings.height)

    def _cached_latents(self, clip_index: int, draw: _Draw) -> dict[str, torch.Tensor]:
        """The cache's rows of the sample's frames then its reference (float32): mean / std (f + 1, 4, h, w) and
        clip_embeds (f + 1, D); only the span of the frames and the reference row are read from the file."""
        from safetensors import safe_open

        path = self.latent_cache_path(clip_index)
        if not path.is_file():
            raise AniPortraitError(f"clip {self.records[clip_index].id}: no precomputed latents at {path}; the stage "
                                   "builds them before training (model.loader.latent_cache=true), or set it false")
        first, last, reference = int(draw.frame_indices.min()), int(draw.frame_indices.max()), int(draw.reference_frame)
        rows = torch.from_numpy(draw.frame_indices - first)
        with safe_open(str(path), framework="pt") as handle:
            return {key: torch.cat([handle.get_slice(key)[first : last + 1][rows],
                                    handle.get_slice(key)[reference : reference + 1]]).float()
                    for key in ("mean", "std", "clip_embeds")}

    def _pose_tensors(self, lmks: np.ndarray, box: tuple[int, int, int, int], source_size: tuple[int, int],
                      flip: bool) -> torch.Tensor:
        """(n, 3, H, W) pose images of landmarks seen through ``box``, flipped as the sample is, then scaled."""
        poses = self._poses(lmks, box, source_size)
        if flip:
            poses = poses[:, :, ::-1]
        return scale_pose_images(torch.from_numpy(np.ascontiguousarray(poses)).permute(0, 3, 1, 2),
                                 self.settings.pose_scaling)

    @staticmethod
    def _identity(index: int, draw: _Draw) -> dict[str, torch.Tensor]:
        """The fields that say which sample this is (every sample has them)."""
        return {"sample_index": torch.tensor(int(index), dtype=torch.long),
                "clip_index": torch.tensor(draw.clip_index, dtype=torch.long),
                "frame_indices": torch.from_numpy(draw.frame_indices),
                "reference_frame": torch.tensor(draw.reference_frame, dtype=torch.long)}

    def _cached_sample(self, index: int, draw: _Draw) -> dict[str, torch.Tensor]:
        """A sample from the latent cache: no frame is decoded; the poses are drawn through the centre crop."""
        record = self.records[draw.clip_index]
        lmks, _ = self.landmarks(draw.clip_index)
        indices = np.concatenate([draw.frame_indices, [draw.reference_frame]])
        cached = self._cached_latents(draw.clip_index, draw)
        source_size = (record.height, record.width)
        pose_images = self._pose_tensors(lmks[indices], self._centre_box(*source_size), source_size, flip=False)
        return {
            "latent_mean": cached["mean"][:-1], "latent_std": cached["std"][:-1],
            "reference_latent_mean": cached["mean"][-1], "reference_latent_std": cached["std"][-1],
            "clip_embeds": cached["clip_embeds"][-1], **self._identity(index, draw),
            "pose_images": pose_images[:-1], "reference_pose": pose_images[-1],
        }

    def cache_inputs(self, clip_index: int) -> tuple[np.ndarray, torch.Tensor]:
        """What the latent cache of a clip is computed from: every frame through the centre crop, (T, H, W, 3) uint8,
        and their CLIP pixels (T, 3, S, S), exactly as an unaugmented sample prepares them."""
        record = self.records[clip_index]
        frames = self.read_frames(clip_index, np.arange(record.frames))
        if frames.shape[1:3] != (record.height, record.width):  # cached samples take the crop from the manifest
            raise AniPortraitError(f"clip {record.id}: its video is {frames.shape[2]}x{frames.shape[1]}, the manifest "
                                   f"says {record.width}x{record.height}; re-run the preparation for this clip")
        images = self._images(frames, self._centre_box(*frames.shape[1:3]))
        clip = self.clip_image_processor(images=list(images), return_tensors="pt").pixel_values
        return images, clip

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        draw = self._draw(int(index))
        if self.latent_cache:
            return self._cached_sample(index, draw)
        lmks, _ = self.landmarks(draw.clip_index)
        indices = np.concatenate([draw.frame_indices, [draw.reference_frame]])
        frames = self.read_frames(draw.clip_index, indices)  # (f + 1, h, w, 3)
        source_size = frames.shape[1:3]
        box = self._centre_box(*source_size) if draw.crop_draw is None else self._crop_box(*source_size, draw.crop_draw)
        images = self._images(frames, box)  # (f + 1, H, W, 3)
        if draw.flip:
            images = images[:, :, ::-1]
        if draw.color is not None:
            images = self._jitter(np.ascontiguousarray(images), draw.color)
        pixels = to_signed_unit(images)  # (f + 1, 3, H, W) in [-1, 1]
        sample = {"pixel_values": pixels[:-1], "reference_image": pixels[-1], **self._identity(index, draw)}
        if not self.conditioning:
            return sample
        reference = np.ascontiguousarray(images[-1])
        clip_image = self.clip_image_processor(images=reference, return_tensors="pt").pixel_values[0]
        pose_images = self._pose_tensors(lmks[indices], box, source_size, draw.flip)  # (f + 1, 3, H, W)
        return {**sample, "pose_images": pose_images[:-1], "reference_pose": pose_images[-1], "clip_image": clip_image}

    def preview(self, index: int, num_frames: int) -> dict[str, Any]:
        """Material for a sample video of clip ``index % clips``, uncropped and unscaled (uint8 images):
        ``reference_image``/``reference_pose`` (H, W, 3) from the clip's first frame with a face, ``pose_images``
        and ground-truth ``frames`` (n, H, W, 3) for up to ``num_frames`` consecutive frames at the smallest
        stride, ``fps`` (of those frames) and ``clip_id``."""
        clip_index = index % len(self.records)
        record = self.records[clip_index]
        lmks, valid = self.landmarks(clip_index)
        rate = min(self.settings.sample_rates)
        frame_indices = np.arange(0, record.frames, rate)[:num_frames]
        reference_frame = int(np.flatnonzero(valid)[0]) if valid.any() else 0
        indices = np.concatenate([frame_indices, [reference_frame]])
        frames = self.read_frames(clip_index, indices)
        box = self._centre_box(*frames.shape[1:3])
        images = self._images(frames, box)
        poses = self._poses(lmks[indices], box, frames.shape[1:3])
        return {"reference_image": images[-1], "reference_pose": poses[-1], "pose_images": poses[:-1],
                "frames": images[:-1], "fps": float(record.fps) / rate, "clip_id": record.id}


class ResumableBatchLoader:
    """Training batches of numbered samples that a resumed run continues where its checkpoint left off.

    Batch ``b`` of epoch ``e`` on rank ``r`` of ``w`` holds the samples ``((e * B + b) * w + r) * n + j``
    (``B`` batches per epoch, ``n`` per batch); the dataset turns a number into a sample deterministically, so
    ranks never overlap and the order depends neither on workers nor on restarts. Lightning stores
    ``state_dict()`` in checkpoints (stateful loaders) and calls ``load_state_dict`` when it resumes.
    """

    def __init__(self, dataset: Dataset, batch_size: int, samples_per_epoch: int, num_workers: int = 0,
                 pin_memory: bool = False, rank: int = 0, world_size: int = 1):
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.rank, self.world_size = int(rank), int(world_size)
        self.batches_per_epoch = int(samples_per_epoch) // (self.batch_size * self.world_size)
        if self.batches_per_epoch < 1:
            raise AniPortraitError(
                f"samples_per_epoch={samples_per_epoch} is smaller than one batch on every process "
                f"({self.batch_size} x {self.world_size}); raise model.loader.samples_per_epoch"
            )
        self.epoch, self.next_batch = 0, 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def sample_numbers(self, epoch: int, batch: int) -> list[int]:
        first = ((epoch * self.batches_per_epoch + batch) * self.world_size + self.rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, first_batch = self.epoch, self.next_batch
        batches = [self.sample_numbers(epoch, batch) for batch in range(first_batch, self.batches_per_epoch)]
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                            pin_memory=self.pin_memory)
        for batch in loader:
            self.next_batch += 1  # counted when handed out: a checkpoint taken after this step resumes after it
            yield batch
        self.epoch, self.next_batch = epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "next_batch": self.next_batch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.next_batch = int(state["epoch"]), int(state["next_batch"])


class VideoFrameDataModule(pl.LightningDataModule):
    """Stage-B data of a clip dataset: random training samples and a fixed validation set.

    ``source`` is a ``data`` config object (``resolve()`` -> dataset root; runs once, on global rank 0, in
    ``prepare_data``). ``sample_rate`` is a stride or a list of strides, one drawn per sample.
    ``clip_image_processor``: CLIPImageProcessor settings matching the backbone's image encoder
    (``{}``: CLIP's 224 px defaults, as official). ``pin_memory``: None pins when CUDA is available.
    ``frame_cache_clips``: whole decoded clips kept per loader process (0: decode the frames a sample needs).
    ``conditioning``: false leaves pose images and CLIP pixels out of the samples (frames-only training).
    ``latent_cache``: samples from precomputed latents (module docstring); true: the stage builds what is missing,
    stored as ``latent_cache_dtype`` (float16, bfloat16 or float32); auto: the stage reads them where every train
    and val clip already has them, made by its VAE and image encoder, and encodes pixels otherwise.
    """

    def __init__(self, source, n_sample_frames: int = 1, sample_rate: int | Sequence[int] = 1, width: int = 512,
                 height: int = 512, pose_scaling: str = "unit", clip_image_processor: Mapping[str, Any] | None = None,
                 crop_scale: Sequence[float] = (1.0, 1.0), horizontal_flip: float = 0.0,
                 color_jitter: Sequence[float] | None = None, batch_size: int = 2,
                 eval_batch_size: int = 2, num_workers: int = 4, pin_memory: bool | None = None,
                 samples_per_epoch: int = 100_000, seed: int = 0, frame_cache_clips: int = 0,
                 conditioning: bool = True, latent_cache: bool | str = False, latent_cache_dtype: str = "float16"):
        super().__init__()
        if latent_cache not in (True, False, "auto"):
            raise AniPortraitError(f"model.loader.latent_cache={latent_cache!r}: expected true, false or auto")
        self.latent_cache_mode: bool | str = latent_cache  # auto: the stage decides (VideoStage1Module)
        self.latent_cache_dtype = str(latent_cache_dtype)
        self.dataset_options = {"frame_cache_clips": int(frame_cache_clips), "conditioning": bool(conditioning),
                                "latent_cache": latent_cache is True}
        self.source = source
        rates = [sample_rate] if isinstance(sample_rate, int) else list(sample_rate)
        self.frame_settings = FrameSettings(
            n_sample_frames=int(n_sample_frames), sample_rates=tuple(int(rate) for rate in rates), width=int(width),
            height=int(height), pose_scaling=pose_scaling, crop_scale=tuple(float(v) for v in crop_scale),
            horizontal_flip=float(horizontal_flip),
            color_jitter=tuple(float(v) for v in (color_jitter or (0.0, 0.0, 0.0, 0.0))),
        )
        processor = clip_image_processor or {}
        if isinstance(processor, DictConfig):
            processor = OmegaConf.to_container(processor, resolve=True)
        self.clip_image_processor = CLIPImageProcessor(**processor)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.samples_per_epoch, self.seed = int(samples_per_epoch), int(seed)
        self.root: Path | None = None
        self.fps: float | None = None
        self.datasets: dict[str, VideoFrameDataset] = {}

    @property
    def settings(self) -> dict[str, Any]:
        """What a model trained on this data must know at inference (stored in its bundle)."""
        frames = self.frame_settings
        return {"fps": self.fps, "width": frames.width, "height": frames.height,
                "n_sample_frames": frames.n_sample_frames, "sample_rate": list(frames.sample_rates),
                "pose_scaling": frames.pose_scaling, "clip_image_size": self.clip_image_processor.crop_size["height"]}

    def prepare_data(self) -> None:
        self.source.resolve()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.root = self.source.resolve()
        manifest = Manifest.load(self.root)
        for split in ("train", "val", "test"):
            records = manifest.split(split)
            training = split == "train"
            if not training and records and max(record.frames for record in records) < self.frame_settings.min_clip_frames:
                log.warning("%s: all %d %s clips are shorter than %d frames; the split is left out", self.root,
                            len(records), split, self.frame_settings.min_clip_frames)
                continue
            if not records:
                continue
            self.datasets[split] = VideoFrameDataset(
                self.root, records, self.frame_settings, self.clip_image_processor, split=split,
                random_clips=training, augment=training, length=self.samples_per_epoch, seed=self.seed,
                **self.dataset_options,
            )
        if "train" not in self.datasets:
            raise AniPortraitError(f"{self.root}: the manifest has no train clips")
        if "val" not in self.datasets:
            log.warning("%s: no val clips; validating on the train clips", self.root)
            self.datasets["val"] = VideoFrameDataset(
                self.root, manifest.split("train"), self.frame_settings, self.clip_image_processor, split="train",
                random_clips=False, augment=False, seed=self.seed, **self.dataset_options)
        fps_values, counts = np.unique([record.fps for record in self.datasets["train"].records], return_counts=True)
        self.fps = float(fps_values[np.argmax(counts)])

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> ResumableBatchLoader:
        rank, world_size = self._rank()
        return ResumableBatchLoader(self.datasets["train"], self.batch_size, self.samples_per_epoch, self.num_workers,
                                    self.pin_memory, rank, world_size)

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers, pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.datasets:
            raise AniPortraitError(f"{self.root}: the manifest has no test clips")
        return self._eval_loader("test")

    def preview_samples(self, count: int | None, num_frames: int, split: str = "val") -> list[dict[str, Any]]:
        """``count`` (None: all) sample-video inputs from the clips of ``split`` (see :meth:`VideoFrameDataset.preview`)."""
        if split not in self.datasets:
            raise AniPortraitError(f"{self.root}: the manifest has no {split} clips")
        dataset = self.datasets[split]
        count = len(dataset.records) if count is None else count
        return [dataset.preview(index, num_frames) for index in range(min(count, len(dataset.records)))]
