"""FID over video frames: Inception-v3 pool3 (2048-d) features per frame, torch-fidelity's network.

The network is torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's ``FeatureExtractorInceptionV3``, the
TensorFlow FID weights): uint8 RGB frames of any size are resized to 299 x 299 inside it. We resize as
torch-fidelity and the TensorFlow reference do (TF1 bilinear, ``antialias=False``) by default; torchmetrics'
own default (``antialias=True``) gives different numbers, so the choice is a protocol value written into the
results. Covariances are unbiased (n - 1), as in torch-fidelity and torchmetrics.
"""

from __future__ import annotations

import io
import os

import torch
from torch import nn

from aniportrait.metrics.frechet import FeatureSets, FrechetMetric
from aniportrait.metrics.weights import calibrate_batch_norm

__all__ = ["FrechetInceptionDistance", "load_inception", "random_inception", "INCEPTION_FEATURES"]

INCEPTION_FEATURES = 2048


def _inception_class():
    from torchmetrics.image.fid import NoTrainInceptionV3

    class RandomInitInceptionV3(NoTrainInceptionV3):
        """The same network with its constructor's weight load skipped (it is given an empty state dict)."""

        def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
            if state_dict:
                return super().load_state_dict(state_dict, strict=strict, assign=assign)
            return None

    return NoTrainInceptionV3, RandomInitInceptionV3


def load_inception(weights_path: str | os.PathLike, antialias: bool = False) -> nn.Module:
    """Inception-v3 with the torch-fidelity weights file (``weights-inception-2015-12-05-6726825d.pth``)."""
    network_class, _ = _inception_class()
    return network_class("inception-v3-compat", [str(INCEPTION_FEATURES)], str(weights_path), antialias=antialias)


def random_inception(seed: int = 0, antialias: bool = False) -> nn.Module:
    """Inception-v3 of the same architecture with random weights: pipeline tests and speed benchmarks only."""
    _, random_class = _inception_class()
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = random_class("inception-v3-compat", [str(INCEPTION_FEATURES)], empty, antialias=antialias)
        calibrate_batch_norm(network, torch.randint(0, 256, (8, 3, 96, 96), dtype=torch.uint8))
    return network


class FrechetInceptionDistance(FrechetMetric):
    """FID between named sets of frames; ``reference`` is the ground truth set.

    ``network``: uint8 (n, 3, H, W) -> (n, d) features, :func:`load_inception` or any module of that contract.
    """

    def __init__(self, network: nn.Module, device: str | torch.device = "cpu", batch_size: int = 64):
        self.network = network.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.sets = FeatureSets(unbiased=True)

    @torch.no_grad()
    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """frames: uint8 (T, H, W, 3) -> (T, d) float64 on the metric's device."""
        outputs = []
        for start in range(0, len(frames), self.batch_size):
            batch = frames[start : start + self.batch_size].to(self.device).permute(0, 3, 1, 2)  # (b, 3, H, W)
            outputs.append(self.network(batch.contiguous()).to(torch.float64))
        return torch.cat(outputs)
