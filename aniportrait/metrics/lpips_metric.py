"""LPIPS per frame with the ``lpips`` package (v0.1, AlexNet by default, VGG-16 as an option).

The package ships its calibrated linear layers; its backbone is torchvision's ImageNet network, which
torchvision would download. We build the package's model with a random trunk (``pnet_rand=True``, no
download) and load the backbone weights ourselves from a torchvision state-dict file (config
``metrics.lpips_backbone``, else the cached public download), so offline runs fail with a reason instead of
a traceback, and tests can load random backbones of the same architecture.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings

import torch
from torch import nn

__all__ = ["LPIPS", "build_lpips", "LPIPS_NETS"]

LPIPS_NETS = ("alex", "vgg")


def build_lpips(net: str = "alex", backbone_state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """``lpips.LPIPS(net=net)`` with the backbone from a torchvision ``alexnet``/``vgg16`` state dict.

    ``backbone_state_dict``: keys ``features.<i>.weight`` / ``.bias`` (torchvision's layout; ``classifier.*``
    keys are ignored); None keeps the random trunk (tests, benchmarks).
    """
    import lpips

    if net not in LPIPS_NETS:
        raise ValueError(f"LPIPS net must be one of {LPIPS_NETS}, got {net!r}")
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # a banner, torchvision deprecations
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    if backbone_state_dict is not None:
        trunk = model.net
        # lpips keeps torchvision's layer numbers inside its slices: slice<k>.<i>.weight == features.<i>.weight
        mapped = {key: backbone_state_dict[re.sub(r"^slice\d+\.", "features.", key)] for key in trunk.state_dict()}
        trunk.load_state_dict(mapped)
    return model.eval().requires_grad_(False)


def load_backbone_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class LPIPS:
    """Per-frame LPIPS between generated and reference frames (uint8 (T, H, W, 3), same size)."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", batch_size: int = 16):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size

    @staticmethod
    def to_input(frames: torch.Tensor) -> torch.Tensor:
        """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1], the range lpips expects."""
        return frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0

    @torch.no_grad()
    def __call__(self, generated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """-> (T,) float32 on the CPU."""
        if generated.shape != reference.shape:
            raise ValueError(f"LPIPS needs frames of one shape, got {tuple(generated.shape)} and {tuple(reference.shape)}")
        scores = []
        for start in range(0, len(generated), self.batch_size):
            window = slice(start, start + self.batch_size)
            first = self.to_input(generated[window].to(self.device))
            second = self.to_input(reference[window].to(self.device))
            scores.append(self.model(first, second).reshape(-1).float().cpu())
        return torch.cat(scores)
