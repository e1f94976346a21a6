"""FVD: Kinetics-400 I3D features of 16-frame clips, the TorchScript detector StyleGAN-V uses.

Protocol (written into the results): from every scored video, ``clips_per_video`` windows of
``clip_frames`` consecutive frames (every ``frame_stride``-th frame) are drawn; the start frames come from a
generator seeded by ``(seed, crc32(clip id))``, so they do not depend on which other clips are present, and
the generated and the ground-truth video of a clip use the same windows. Each frame is resized so that its
short side is 224 (bilinear, no antialiasing, as the detector's own ``resize=True`` path does for square
frames), centre-cropped to 224 x 224 and scaled to [-1, 1]; the detector then runs with
``rescale=False, resize=False, return_features=True`` (the 400-d pre-softmax features). The Fréchet
distance uses StyleGAN-V's biased covariances (divided by n).

:class:`I3DShaped` is a random-init network of I3D's layout (Inception-v1 inflated to 3-D) with the
TorchScript detector's call signature, for tests and speed benchmarks where the real weights are absent.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aniportrait.metrics.frechet import FeatureSets, FrechetMetric
from aniportrait.metrics.weights import calibrate_batch_norm

__all__ = ["FrechetVideoDistance", "load_i3d", "clip_starts", "preprocess_clips", "I3DShaped", "random_i3d", "I3D_SIZE"]

I3D_SIZE = 224


def load_i3d(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """StyleGAN-V's ``i3d_torchscript.pt`` (or any TorchScript module with its call signature)."""
    return torch.jit.load(str(path), map_location=torch.device(device)).eval()


def clip_starts(num_frames: int, clip_id: str, clip_frames: int = 16, clips_per_video: int = 1,
                frame_stride: int = 1, seed: int = 0) -> list[int]:
    """Sorted start frames of the FVD windows of one video; [] when it is shorter than one window."""
    span = (clip_frames - 1) * frame_stride + 1
    candidates = num_frames - span + 1
    if candidates <= 0:
        return []
    rng = np.random.default_rng([seed, zlib.crc32(clip_id.encode())])
    count = min(clips_per_video, candidates)
    return sorted(int(start) for start in rng.choice(candidates, size=count, replace=False))


def preprocess_clips(clips: torch.Tensor, size: int = I3D_SIZE) -> torch.Tensor:
    """uint8 (n, T, H, W, 3) -> float (n, 3, T, size, size) in [-1, 1]: short side to ``size``, centre crop."""
    n, frames, height, width, _ = clips.shape
    scale = size / min(height, width)
    resized_h, resized_w = max(size, round(height * scale)), max(size, round(width * scale))
    x = clips.permute(0, 1, 4, 2, 3).reshape(n * frames, 3, height, width).float()  # (n*T, 3, H, W)
    if (resized_h, resized_w) != (height, width):
        x = F.interpolate(x, size=(resized_h, resized_w), mode="bilinear", align_corners=False)
    top, left = (resized_h - size) // 2, (resized_w - size) // 2
    x = x[:, :, top : top + size, left : left + size]
    x = x / 127.5 - 1.0
    return x.reshape(n, frames, 3, size, size).permute(0, 2, 1, 3, 4).contiguous()


class FrechetVideoDistance(FrechetMetric):
    """FVD between named sets of clips; ``reference`` is the ground truth set.

    ``detector``: called as ``detector(x, rescale=False, resize=False, return_features=True)`` on
    (n, 3, T, 224, 224) floats in [-1, 1] -> (n, d); :func:`load_i3d` or :class:`I3DShaped`.
    """

    def __init__(self, detector: nn.Module, device: str | torch.device = "cpu", batch_size: int = 8):
        self.detector = detector.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.sets = FeatureSets(unbiased=False)

    @torch.no_grad()
    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """clips: uint8 (n, T, H, W, 3) -> (n, d) float64 on the metric's device."""
        outputs = []
        for start in range(0, len(clips), self.batch_size):
            batch = preprocess_clips(clips[start : start + self.batch_size].to(self.device))
            outputs.append(self.detector(batch, rescale=False, resize=False, return_features=True).to(torch.float64))
        return torch.cat(outputs)


class _Unit3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride, padding=tuple(k // 2 for k in kernel), bias=False)
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class _Mixed(nn.Module):
    """I3D's inception block: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | pool -> 1x1, concatenated."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.branch0 = _Unit3D(in_channels, widths[0])
        self.branch1 = nn.Sequential(_Unit3D(in_channels, widths[1]), _Unit3D(widths[1], widths[2], (3, 3, 3)))
        self.branch2 = nn.Sequential(_Unit3D(in_channels, widths[3]), _Unit3D(widths[3], widths[4], (3, 3, 3)))
        self.branch3 = nn.Sequential(nn.MaxPool3d(3, 1, 1), _Unit3D(in_channels, widths[5]))
        self.out_channels = widths[0] + widths[2] + widths[4] + widths[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], dim=1)


# Inception-I3D's mixed blocks (Carreira & Zisserman 2017), channel widths as in the Kinetics-400 model.
_I3D_BLOCKS = (
    ("3b", (64, 96, 128, 16, 32, 32)), ("3c", (128, 128, 192, 32, 96, 64)), ("pool", None),
    ("4b", (192, 96, 208, 16, 48, 64)), ("4c", (160, 112, 224, 24, 64, 64)), ("4d", (128, 128, 256, 24, 64, 64)),
    ("4e", (112, 144, 288, 32, 64, 64)), ("4f", (256, 160, 320, 32, 128, 128)), ("pool2", None),
    ("5b", (256, 160, 320, 32, 128, 128)), ("5c", (384, 192, 384, 48, 128, 128)),
)


class I3DShaped(nn.Module):
    """Random-init network of I3D's layout and call signature (input (n, 3, T, H, W), 400-d features).

    ``width`` scales every channel count (1.0: I3D's own widths and cost; smaller for fast tests). Not the
    Kinetics weights: FVD numbers made with it only test the pipeline. Scriptable with ``torch.jit.script``.
    """

    def __init__(self, width: float = 1.0, num_features: int = 400):
        super().__init__()

        def scaled(channels: int) -> int:
            return max(4, int(round(channels * width)))

        layers: list[nn.Module] = [
            _Unit3D(3, scaled(64), (7, 7, 7), (2, 2, 2)), nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            _Unit3D(scaled(64), scaled(64)), _Unit3D(scaled(64), scaled(192), (3, 3, 3)),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
        ]
        channels = scaled(192)
        for name, widths in _I3D_BLOCKS:
            if widths is None:
                layers.append(nn.MaxPool3d(3, 2, 1) if name == "pool" else nn.MaxPool3d(2, 2))
                continue
            block = _Mixed(channels, tuple(scaled(w) for w in widths))
            layers.append(block)
            channels = block.out_channels
        self.features = nn.Sequential(*layers)
        self.input_size = I3D_SIZE
        self.logits = nn.Conv3d(channels, num_features, 1)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if rescale:
            x = x.float() / 127.5 - 1.0
        if resize:
            x = F.interpolate(x, size=(x.shape[2], self.input_size, self.input_size), mode="trilinear", align_corners=False)
        x = self.logits(self.features(x)).mean(dim=(2, 3, 4))  # (n, 400)
        return x if return_features else torch.softmax(x, dim=1)


def random_i3d(width: float = 1.0, seed: int = 0) -> I3DShaped:
    """:class:`I3DShaped` with seeded random weights and BatchNorm statistics set from one noise batch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = I3DShaped(width)
        calibrate_batch_norm(network, torch.rand(2, 3, 16, 64, 64) * 2 - 1)
    return network.eval()
