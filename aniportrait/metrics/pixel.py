"""SSIM and PSNR per frame through torchmetrics.

Frames are uint8 RGB; both metrics see them as floats in [0, 1] (data range 1). SSIM: torchmetrics'
definition, Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, the frame mirror-padded by 5 pixels and the
SSIM map averaged over every pixel and the three colour channels (scikit-image instead crops the 5-pixel
border: about 1e-4 apart on 64 x 64 noise, less on larger frames). PSNR is per frame, then averaged over frames by the caller; identical
frames (MSE 0, an infinite PSNR) score ``PSNR_CAP_DB`` = 100 dB, above any real reconstruction of 8-bit
video (one grey level of error on one pixel of a 512 x 512 frame is ~ 102 dB), so averages stay finite.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

__all__ = ["ssim_per_frame", "psnr_per_frame", "PSNR_CAP_DB"]

PSNR_CAP_DB = 100.0


def _as_float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [0, 1]."""
    return frames.permute(0, 3, 1, 2).float() / 255.0


def _check(generated: torch.Tensor, reference: torch.Tensor) -> None:
    if generated.shape != reference.shape:
        raise ValueError(f"frames differ in shape: {tuple(generated.shape)} and {tuple(reference.shape)}")


@torch.no_grad()
def ssim_per_frame(generated: torch.Tensor, reference: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """uint8 (T, H, W, 3) pair -> (T,) float32 on the CPU."""
    _check(generated, reference)
    scores = []
    for start in range(0, len(generated), batch_size):
        window = slice(start, start + batch_size)
        scores.append(structural_similarity_index_measure(
            _as_float(generated[window]), _as_float(reference[window]), data_range=1.0, reduction="none").float().cpu())
    return torch.cat(scores)


@torch.no_grad()
def psnr_per_frame(generated: torch.Tensor, reference: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """uint8 (T, H, W, 3) pair -> (T,) float32 dB on the CPU (``PSNR_CAP_DB`` for identical frames)."""
    _check(generated, reference)
    scores = []
    for start in range(0, len(generated), batch_size):
        window = slice(start, start + batch_size)
        scores.append(peak_signal_noise_ratio(_as_float(generated[window]), _as_float(reference[window]), data_range=1.0,
                                              reduction="none", dim=(1, 2, 3)).float().cpu())
    return torch.cat(scores).clamp(max=PSNR_CAP_DB)
