"""Pretrained weights of the metric networks: a local path from config, else a cached download, else unavailable.

A metric whose network cannot be had is reported as unavailable, with the reason, instead of as a number:
:class:`MetricUnavailable` carries that reason from here to the results table. Downloads land in
``$ANIPORTRAIT_CACHE/metrics`` (default ``~/.cache/aniportrait/metrics``) and are reused from there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from aniportrait.utils.atomic import atomic_path

__all__ = ["MetricUnavailable", "WeightSource", "WEIGHT_SOURCES", "resolve_weights", "file_digest", "cache_dir",
           "calibrate_batch_norm"]

log = logging.getLogger(__name__)


class MetricUnavailable(Exception):
    """A metric cannot be computed here (no weights, no audio, no face); ``str(error)`` says why and the fix."""


@dataclass(frozen=True)
class WeightSource:
    """Where one metric network's public weights come from."""

    config_key: str  # metrics.<config_key> holds a local path
    filename: str
    url: str | None  # None: no public download (the user must give a path)
    what: str


WEIGHT_SOURCES: dict[str, WeightSource] = {
    "inception": WeightSource(
        "inception", "weights-inception-2015-12-05-6726825d.pth",
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
        "Inception-v3 (TF FID weights, torch-fidelity format)"),
    "i3d": WeightSource(
        "i3d", "i3d_torchscript.pt", "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1",
        "Kinetics-400 I3D TorchScript (StyleGAN-V's FVD detector)"),
    "syncnet": WeightSource(
        "syncnet", "syncnet_v2.model", "http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model",
        "SyncNet v2 (syncnet_python)"),
    "lpips_alex": WeightSource(
        "lpips_backbone", "alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        "torchvision AlexNet ImageNet weights (LPIPS backbone)"),
    "lpips_vgg": WeightSource(
        "lpips_backbone", "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth",
        "torchvision VGG-16 ImageNet weights (LPIPS backbone)"),
    "arcface": WeightSource(
        "arcface", "arcface.pt", None,
        "ArcFace-family face recognition network as TorchScript: (N, 3, 112, 112) RGB in [-1, 1] -> (N, D)"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("ANIPORTRAIT_CACHE", Path.home() / ".cache" / "aniportrait")) / "metrics"


def resolve_weights(name: str, path: str | os.PathLike | None, download: bool = True, timeout_s: float = 30.0) -> Path:
    """The weights file of metric network ``name`` (a key of :data:`WEIGHT_SOURCES`).

    ``path`` (config ``metrics.<key>``) wins and must exist; otherwise the cached download, else a download
    when allowed. Raises :class:`MetricUnavailable` naming the config key and the URL when none works.
    """
    source = WEIGHT_SOURCES[name]
    if path:
        local = Path(path).expanduser()
        if not local.is_file():
            raise MetricUnavailable(f"metrics.{source.config_key}={local} does not exist; point it at the "
                                    f"{source.what} file")
        return local
    cached = cache_dir() / source.filename
    if cached.is_file():
        return cached
    if source.url is None:
        raise MetricUnavailable(f"no {source.what}: set metrics.{source.config_key}=PATH (there is no public download)")
    if not download:
        raise MetricUnavailable(f"no {source.what} and downloads are off (metrics.download=false): set "
                                f"metrics.{source.config_key}=PATH or download {source.url} to {cached}")
    try:
        with atomic_path(cached) as tmp, urllib.request.urlopen(source.url, timeout=timeout_s) as response:
            tmp.write_bytes(response.read())
    except OSError as error:
        raise MetricUnavailable(f"cannot download the {source.what} ({error}): set metrics.{source.config_key}=PATH "
                                f"or download {source.url} to {cached}") from error
    log.info("downloaded %s to %s", source.what, cached)
    return cached


def file_digest(path: str | os.PathLike) -> str:
    """First 16 hex digits of the file's sha256: written into the results so a score names its weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def calibrate_batch_norm(network: nn.Module, *inputs: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics from one forward pass of ``inputs``.

    Random-init networks keep BatchNorm's default statistics (mean 0, variance 1), under which activations
    shrink layer after layer until the features are ~1e-8; statistics of a real batch keep them at unit scale.
    """
    norms = [module for module in network.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one batch sets the statistics exactly
        norm.training = True
    with torch.no_grad():
        network(*inputs)
    for norm in norms:
        norm.training = False
