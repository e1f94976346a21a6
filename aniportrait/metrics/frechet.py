"""The Fréchet distance between two Gaussians fitted to network features (FID, FVD).

``d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``, in float64. The trace of the matrix square root is
computed from eigenvalues: ``tr((S1 S2)^(1/2)) = sum sqrt(eig(R1 S2 R1))`` with ``R1 = S1^(1/2)`` (symmetric
eigen-decompositions only), which is real and exact for the positive semi-definite covariances we have,
where ``scipy.linalg.sqrtm(S1 @ S2)`` (pytorch-fid, StyleGAN-V) can return complex noise for singular
covariances (fewer samples than feature dimensions, the usual case for FVD).

:class:`FeatureStatistics` streams features into float64 sums, so any number of clips fits in memory.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["FeatureStatistics", "FeatureSets", "FrechetMetric", "frechet_distance"]


class FeatureStatistics:
    """Running mean and covariance of feature vectors (float64 sums, as torchmetrics and StyleGAN-V keep them).

    The sums stay on the device of the first features (no per-batch copies off the GPU). ``unbiased``:
    covariance divided by n - 1 (torch-fidelity / torchmetrics FID, pytorch-fid) or by n (StyleGAN-V's FVD);
    each metric uses its reference's choice.
    """

    def __init__(self, unbiased: bool = True):
        self.unbiased = unbiased
        self.count = 0
        self._sum: torch.Tensor | None = None  # (d,) float64
        self._outer_sum: torch.Tensor | None = None  # (d, d) float64

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """features: (n, d)."""
        features = torch.as_tensor(features).to(torch.float64)
        if features.ndim != 2:
            raise ValueError(f"features must be (n, d), got {tuple(features.shape)}")
        if self._sum is None:
            self._sum = torch.zeros(features.shape[1], dtype=torch.float64, device=features.device)
            self._outer_sum = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64, device=features.device)
        elif features.shape[1] != self._sum.shape[0]:
            raise ValueError(f"features have {features.shape[1]} dimensions, earlier ones {self._sum.shape[0]}")
        features = features.to(self._sum.device)
        self._sum += features.sum(dim=0)
        self._outer_sum += features.T @ features
        self.count += features.shape[0]

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (d,), covariance (d, d)) as float64 tensors on the statistics' device."""
        self._require(2)
        mean = self._sum / self.count
        scatter = self._outer_sum - self.count * torch.outer(mean, mean)
        return mean, scatter / (self.count - 1 if self.unbiased else self.count)

    @property
    def mean(self) -> np.ndarray:
        self._require(1)
        return (self._sum / self.count).cpu().numpy()

    @property
    def covariance(self) -> np.ndarray:
        return self.moments()[1].cpu().numpy()

    def _require(self, count: int) -> None:
        if self.count < count:
            raise ValueError(f"{count} or more feature vectors are needed, got {self.count}")


class FeatureSets:
    """Named feature statistics (``reference``, ``generated``, sanity baselines) and distances between them."""

    def __init__(self, unbiased: bool = True):
        self.unbiased = unbiased
        self.sets: dict[str, FeatureStatistics] = {}

    def update(self, name: str, features: torch.Tensor | np.ndarray) -> None:
        self.sets.setdefault(name, FeatureStatistics(self.unbiased)).update(features)

    def count(self, name: str) -> int:
        return self.sets[name].count if name in self.sets else 0

    def distance(self, name: str, reference: str = "reference") -> float:
        """Fréchet distance between set ``name`` and set ``reference``."""
        for key in (name, reference):
            if self.count(key) < 2:
                raise ValueError(f"the Fréchet distance needs 2 or more feature vectors in set {key!r}, got {self.count(key)}")
        return frechet_distance(*self.sets[name].moments(), *self.sets[reference].moments())


class FrechetMetric:
    """A Fréchet distance between named sets of inputs (FID, FVD): subclasses define ``features(inputs)``."""

    sets: FeatureSets

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, name: str, inputs: torch.Tensor) -> torch.Tensor:
        """Add inputs to set ``name``; returns their features for reuse."""
        features = self.features(inputs)
        self.sets.update(name, features)
        return features

    def add_features(self, name: str, features: torch.Tensor) -> None:
        """Add features computed earlier (e.g. the ground truth's, for the ground-truth sanity row)."""
        self.sets.update(name, features)

    def compute(self, name: str, reference: str = "reference") -> float:
        return self.sets.distance(name, reference)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mean1, cov1, mean2, cov2) -> float:
    """Fréchet distance between N(mean1, cov1) and N(mean2, cov2) in float64; means (d,), covariances (d, d).

    numpy arrays or tensors; tensors are used on their device (a GPU computes the eigen-decompositions of
    2048 x 2048 covariances in milliseconds).
    """
    device = next((x.device for x in (mean1, cov1, mean2, cov2) if isinstance(x, torch.Tensor)), torch.device("cpu"))
    mean1, cov1, mean2, cov2 = (torch.as_tensor(x).to(device, torch.float64) for x in (mean1, cov1, mean2, cov2))
    if mean1.shape != mean2.shape or cov1.shape != cov2.shape or cov1.shape != (mean1.shape[0],) * 2:
        raise ValueError(f"mismatched statistics: means {tuple(mean1.shape)} {tuple(mean2.shape)}, "
                         f"covariances {tuple(cov1.shape)} {tuple(cov2.shape)}")
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2.0 * trace_sqrt
    return float(distance.clamp(min=0))
