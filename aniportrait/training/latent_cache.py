"""Precomputed latents for stage B (``model.loader.latent_cache: true``): the frozen VAE and CLIP image encoder run
once per frame of the dataset instead of once per sample and step. ``auto`` (stages 1 and 2's default) reads them
when every train and val clip has a matching file and encodes pixels otherwise, so one run with ``true`` (or a
stopped one: building resumes) serves every later run on the same data and backbone.

Per clip, ``<clip dir>/latents_<W>x<H>.safetensors`` holds the VAE posterior of every frame through the loader's
centre crop (``mean`` and ``std``, (T, 4, h, w), unscaled: the step draws ``mean + std * eps`` with the same
noise the pixel path would draw, then scales) and the CLIP image embedding of every frame (``clip_embeds``,
(T, D); a sample uses its reference frame's). The file's metadata names what it was made from: the output size,
the frame count and source size, the stored dtype, and fingerprints of the VAE's encoder side and of the image
encoder (a hash of every parameter's sums). A file whose metadata does not match is rebuilt; one that matches is kept, so building
resumes where a stopped run left off. Files are written under a temporary name and renamed.

With float32 files the step computes what the pixel path computes (``tests/training/test_latent_cache.py``);
float16 (the default) halves the files at a rounding of the posterior's mean and std of about 1e-3 relative.
Stored at 512 x 512 in float16: 128 KiB of latents and 1.5 KiB of embeddings a frame.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from aniportrait.data.video_frames import VideoFrameDataset
from aniportrait.errors import AniPortraitError
from aniportrait.utils.atomic import atomic_path
from aniportrait.utils.pixels import to_signed_unit

__all__ = ["fingerprint", "ensure_latent_cache", "cache_coverage", "CACHE_DTYPES"]

log = logging.getLogger(__name__)

CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def fingerprint(module: torch.nn.Module, parts: tuple[str, ...] | None = None) -> str:
    """A short identity of the weights a cache depends on: sha256 over every parameter's shape, sum and absolute
    sum (float64, to 12 significant digits) of ``module``, or of its submodules ``parts`` only (the VAE: its encoder
    side). The same weights give the same identity in any memory format (channels-last) and on any device."""
    modules = [module] if parts is None else [getattr(module, name) for name in parts if hasattr(module, name)]
    digest = hashlib.sha256()
    for part in modules:
        for name, parameter in part.named_parameters():
            values = parameter.detach().contiguous().double()  # one summation order whatever the layout
            digest.update(f"{name}{tuple(values.shape)}".encode())
            total, magnitude = (float(value) for value in torch.stack([values.sum(), values.abs().sum()]).cpu())
            digest.update(f"{total:.12g} {magnitude:.12g}".encode())
    return digest.hexdigest()[:20]


def _metadata(dataset: VideoFrameDataset, clip_index: int, vae_print: str, encoder_print: str, dtype: str) -> dict[str, str]:
    record = dataset.records[clip_index]
    return {"width": str(dataset.settings.width), "height": str(dataset.settings.height), "frames": str(record.frames),
            "source_size": f"{record.width}x{record.height}", "dtype": dtype, "vae": vae_print,
            "image_encoder": encoder_print, "clip_size": json.dumps(dict(dataset.clip_image_processor.crop_size), sort_keys=True)}


def _matches(path: Path, expected: dict[str, str]) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() == expected
    except Exception:  # a torn or foreign file: rebuilt
        return False


@torch.no_grad()
def _encode_clip(dataset: VideoFrameDataset, clip_index: int, vae: Any, image_encoder: Any, batch_size: int,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    record = dataset.records[clip_index]
    images, clip_pixels = dataset.cache_inputs(clip_index)
    if images.shape[0] != record.frames:
        raise AniPortraitError(f"clip {record.id}: decoded {images.shape[0]} frames, the manifest says {record.frames}")
    device = next(vae.parameters()).device
    pixels = to_signed_unit(images)  # as a sample's pixel_values
    means, stds, embeds = [], [], []
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start : start + batch_size].to(device, vae.dtype)
        posterior = vae.encode(chunk).latent_dist
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
        clip_chunk = clip_pixels[start : start + batch_size].to(device, image_encoder.dtype)
        embeds.append(image_encoder(clip_chunk).image_embeds.float().cpu())
    return {"mean": torch.cat(means).to(dtype).contiguous(), "std": torch.cat(stds).to(dtype).contiguous(),
            "clip_embeds": torch.cat(embeds).to(dtype).contiguous()}


def _work(datasets: Iterable[VideoFrameDataset], vae: Any, image_encoder: Any, dtype: str,
          ) -> dict[Path, tuple[VideoFrameDataset, int, dict[str, str]]]:
    """Every cache file of ``datasets``: the dataset and clip it holds, and the metadata it must carry."""
    if dtype not in CACHE_DTYPES:
        raise AniPortraitError(f"model.loader.latent_cache_dtype={dtype!r}: expected one of {', '.join(CACHE_DTYPES)}")
    vae_print, encoder_print = fingerprint(vae, ("encoder", "quant_conv")), fingerprint(image_encoder)
    work: dict[Path, tuple[VideoFrameDataset, int, dict[str, str]]] = {}
    for dataset in datasets:
        for clip_index in range(len(dataset.records)):
            path = dataset.latent_cache_path(clip_index)
            work.setdefault(path, (dataset, clip_index, _metadata(dataset, clip_index, vae_print, encoder_print, dtype)))
    return work


def cache_coverage(datasets: Iterable[VideoFrameDataset], vae: Any, image_encoder: Any, dtype: str = "float16",
                   ) -> tuple[int, int]:
    """(files that match, files needed) for the clips of ``datasets``: made by these weights, at this size and
    dtype (``model.loader.latent_cache: auto`` reads the cache only when every one matches). Nothing is written."""
    work = _work(datasets, vae, image_encoder, dtype)
    return sum(_matches(path, metadata) for path, (_, _, metadata) in work.items()), len(work)


def ensure_latent_cache(datasets: Iterable[VideoFrameDataset], vae: Any, image_encoder: Any, dtype: str = "float16",
                        batch_size: int = 16, rank: int = 0, world_size: int = 1, progress: bool = True) -> dict[str, int]:
    """Build the missing or stale cache files of every clip of ``datasets`` (this rank's share: clips
    ``rank::world_size`` of the union, so ranks never write the same file); returns counts of built and kept."""
    work = _work(datasets, vae, image_encoder, dtype)
    paths = sorted(work)[rank::world_size]
    stale = [path for path in paths if not _matches(path, work[path][2])]
    counts = {"built": 0, "kept": len(paths) - len(stale)}
    for path in tqdm(stale, desc="latent cache", unit="clip", disable=not progress or not stale):
        dataset, clip_index, metadata = work[path]
        tensors = _encode_clip(dataset, clip_index, vae, image_encoder, batch_size, CACHE_DTYPES[dtype])
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        counts["built"] += 1
    if stale:
        log.info("latent cache: %d clips built, %d kept (%s)", counts["built"], counts["kept"], dtype)
    return counts
