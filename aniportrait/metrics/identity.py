"""Identity similarity (CSIM): cosine similarity of ArcFace-family embeddings of aligned faces.

Faces are aligned as insightface does for ArcFace: a least-squares similarity transform (Umeyama) maps
five points (eye centres, nose tip, mouth corners; taken from our MediaPipe landmarks: iris centres 468 /
473, vertex 1, vertices 61 / 291) onto the standard 112 x 112 template, then the network sees RGB scaled to
[-1, 1]. The network is any TorchScript module (N, 3, 112, 112) -> (N, D) given by config
``metrics.arcface`` (e.g. an insightface ``arcface_torch`` iresnet traced with ``torch.jit.trace``); there is
no public download, so without it CSIM is unavailable. CSIM of a video = mean over frames of the cosine
similarity between each frame's embedding and the embedding of the identity source (the reference image).
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IdentitySimilarity", "load_arcface", "random_arcface", "align_faces", "five_points", "ARCFACE_TEMPLATE"]

ARCFACE_SIZE = 112
# insightface's arcface_dst: left eye, right eye, nose tip, left and right mouth corner (image left/right).
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                             [70.7299, 92.2041]], dtype=np.float64)
# MediaPipe points in the template's order: the image-left eye is the subject's right iris (468).
_FIVE_POINT_LANDMARKS = (468, 473, 1, 61, 291)


def load_arcface(path: str | os.PathLike) -> torch.jit.ScriptModule:
    return torch.jit.load(str(path), map_location="cpu").eval()


def random_arcface(seed: int = 0, embedding: int = 512) -> nn.Module:
    """A small random-init convolutional embedder with ArcFace's input/output contract: tests and benchmarks only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        channels = 3
        for width in (32, 64, 128, 256):
            layers += [nn.Conv2d(channels, width, 3, 2, 1), nn.PReLU(width)]
            channels = width
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 7 * 7, embedding)).eval()


def five_points(landmarks_px: np.ndarray) -> np.ndarray:
    """(..., 478, 2) pixel landmarks -> (..., 5, 2) ArcFace alignment points."""
    return landmarks_px[..., list(_FIVE_POINT_LANDMARKS), :2]


def _similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama 1991) mapping source (n, 2) onto target (n, 2): a (2, 3) matrix."""
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    source_centred, target_centred = source - source_mean, target - target_mean
    covariance = target_centred.T @ source_centred / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1
    rotation = u @ np.diag(sign) @ vt
    scale = (singular * sign).sum() / source_centred.var(axis=0).sum()
    translation = target_mean - scale * rotation @ source_mean
    return np.hstack([scale * rotation, translation[:, None]])


def align_faces(frames: np.ndarray, points: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) RGB and (T, 5, 2) pixel points -> (T, 112, 112, 3) aligned faces."""
    return np.stack([cv2.warpAffine(frame, _similarity_transform(face_points.astype(np.float64), ARCFACE_TEMPLATE),
                                    (ARCFACE_SIZE, ARCFACE_SIZE), borderValue=0.0)
                     for frame, face_points in zip(frames, points)])


class IdentitySimilarity:
    """Embeddings of aligned faces and their cosine similarity to an identity source."""

    def __init__(self, network: nn.Module, device: str | torch.device = "cpu", batch_size: int = 64):
        self.network = network.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def embeddings(self, aligned: np.ndarray) -> torch.Tensor:
        """(T, 112, 112, 3) uint8 RGB -> (T, D) unit-length float32 on the CPU."""
        outputs = []
        for start in range(0, len(aligned), self.batch_size):
            batch = torch.from_numpy(aligned[start : start + self.batch_size]).to(self.device)
            batch = batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (b, 3, 112, 112)
            outputs.append(F.normalize(self.network(batch).float(), dim=1).cpu())
        return torch.cat(outputs)

    def __call__(self, aligned: np.ndarray, source_embedding: torch.Tensor) -> torch.Tensor:
        """(T,) cosine similarity of each aligned face to ``source_embedding`` (D,)."""
        return self.embeddings(aligned) @ F.normalize(source_embedding.float(), dim=0)
