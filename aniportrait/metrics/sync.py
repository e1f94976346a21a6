"""Lip sync: LSE-D, LSE-C and the AV offset of SyncNet, computed as syncnet_python's ``SyncNetInstance.evaluate``.

What the reference does, and what we do in its place:

* video at 25 fps (``ffmpeg -r 25``): we resample by nearest timestamp, :func:`resample_indices`;
* face track from S3FD boxes: we take each frame's box from our landmarks (the bounding box of the 468
  mesh points), then crop exactly as ``run_pipeline.crop_video`` does: box half-size ``s = max(w, h) / 2``
  and centre, each median-filtered over 13 frames, the frame padded with grey 110, rows
  ``[y - s, y + s (1 + 2 c))``, columns ``x -+ s (1 + c)`` with crop scale ``c = 0.4``, resized to 224 x 224;
* frames in BGR (``cv2.imread``), floats 0-255 without normalisation, 5-frame windows through the lip
  stream; 16 kHz PCM16 audio, MFCC (13 coefficients, python_speech_features' defaults on the int16 values,
  :func:`mfcc`), 20 MFCC frames (0.2 s) per window, 4 MFCC frames per video frame;
* ``min_length = min(frames, floor(samples / 640))`` and ``min_length - 5`` windows (the reference's
  count, one fewer than would fit); distances of each video window to the audio windows shifted by
  -vshift..vshift (zero-padded features at the ends, ``pairwise_distance``), averaged over windows;
  LSE-D = the smallest mean distance, LSE-C = median minus smallest, AV offset = vshift - argmin.

:class:`SyncNet` is syncnet_python's ``S`` with its parameter names, so ``syncnet_v2.model`` loads as is.
"""

from __future__ import annotations

import decimal
import math
import os
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy.fft import dct
from scipy.signal import medfilt
from torch import nn

__all__ = [
    "SyncNet",
    "SyncScores",
    "SyncMetric",
    "load_syncnet",
    "random_syncnet",
    "mfcc",
    "resample_indices",
    "crop_boxes",
    "crop_faces",
    "to_pcm16",
    "SYNC_FPS",
    "CROP_SIZE",
]

SYNC_FPS = 25
SAMPLE_RATE = 16_000
CROP_SIZE = 224
WINDOW_FRAMES = 5  # video frames per lip window
MFCC_PER_FRAME = 4  # 100 MFCC frames per second / 25 fps
MFCC_WINDOW = 20
MEDIAN_FRAMES = 13  # run_pipeline.crop_video smooths the boxes with medfilt(kernel_size=13)


class SyncNet(nn.Module):
    """syncnet_python's ``S``: an audio stream on MFCC (1, 13, 20) and a lip stream on 5 frames (3, 5, 224, 224)."""

    def __init__(self, num_layers_in_fc_layers: int = 1024):
        super().__init__()
        self.netcnnaud = nn.Sequential(
            nn.Conv2d(1, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=(1, 1), stride=(1, 1)),
            nn.Conv2d(64, 192, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)), nn.BatchNorm2d(192), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=(3, 3), stride=(1, 2)),
            nn.Conv2d(192, 384, kernel_size=(3, 3), padding=(1, 1)), nn.BatchNorm2d(384), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=(3, 3), padding=(1, 1)), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=(3, 3), padding=(1, 1)), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=(3, 3), stride=(2, 2)),
            nn.Conv2d(256, 512, kernel_size=(5, 4), padding=(0, 0)), nn.BatchNorm2d(512), nn.ReLU(),
        )
        self.netfcaud = nn.Sequential(
            nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, num_layers_in_fc_layers))
        self.netfclip = nn.Sequential(
            nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, num_layers_in_fc_layers))
        self.netcnnlip = nn.Sequential(
            nn.Conv3d(3, 96, kernel_size=(5, 7, 7), stride=(1, 2, 2), padding=0), nn.BatchNorm3d(96), nn.ReLU(inplace=True),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            nn.Conv3d(96, 256, kernel_size=(1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)), nn.BatchNorm3d(256),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(inplace=True),
            nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(inplace=True),
            nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(inplace=True),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            nn.Conv3d(256, 512, kernel_size=(1, 6, 6), padding=0), nn.BatchNorm3d(512), nn.ReLU(inplace=True),
        )

    def forward_aud(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 1, 13, 20) MFCC -> (n, 1024)."""
        return self.netfcaud(self.netcnnaud(x).flatten(1))

    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, 5, 224, 224) BGR 0-255 -> (n, 1024)."""
        return self.netfclip(self.netcnnlip(x).flatten(1))


def load_syncnet(path: str | os.PathLike) -> SyncNet:
    """syncnet_python's ``syncnet_v2.model`` (a state dict of ``S``)."""
    model = SyncNet()
    model.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
    return model.eval()


def random_syncnet(seed: int = 0) -> SyncNet:
    """The same architecture with seeded random weights: tests and speed benchmarks only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SyncNet().eval()


# -- audio ------------------------------------------------------------------------------------------------


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> int16 values, as the reference reads its ``pcm_s16le`` wav (MFCC energy depends on scale)."""
    return np.clip(np.round(np.asarray(samples, dtype=np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def _round_half_up(value: float) -> int:
    return int(decimal.Decimal(value).quantize(decimal.Decimal("1"), rounding=decimal.ROUND_HALF_UP))


def _mel_filterbank(filters: int, nfft: int, sample_rate: int) -> np.ndarray:
    """python_speech_features.get_filterbanks (low 0 Hz, high sample_rate / 2): (filters, nfft // 2 + 1)."""
    def hz_to_mel(hz):
        return 2595 * np.log10(1 + hz / 700.0)

    def mel_to_hz(mel):
        return 700 * (10 ** (mel / 2595.0) - 1)

    mel_points = np.linspace(hz_to_mel(0), hz_to_mel(sample_rate / 2), filters + 2)
    bins = np.floor((nfft + 1) * mel_to_hz(mel_points) / sample_rate)
    bank = np.zeros((filters, nfft // 2 + 1))
    for j in range(filters):
        for i in range(int(bins[j]), int(bins[j + 1])):
            bank[j, i] = (i - bins[j]) / (bins[j + 1] - bins[j])
        for i in range(int(bins[j + 1]), int(bins[j + 2])):
            bank[j, i] = (bins[j + 2] - i) / (bins[j + 2] - bins[j + 1])
    return bank


def mfcc(signal: np.ndarray, sample_rate: int = SAMPLE_RATE, numcep: int = 13, filters: int = 26, nfft: int = 512,
         preemphasis: float = 0.97, lifter: int = 22, window_s: float = 0.025, step_s: float = 0.01) -> np.ndarray:
    """``python_speech_features.mfcc(signal, sample_rate)`` with its defaults, in numpy: (frames, numcep).

    Rectangular 25 ms windows every 10 ms (the last zero-padded), pre-emphasis, 512-point power spectrum,
    26 mel filters, log, orthonormal DCT-II, sinusoidal lifter 22, and coefficient 0 replaced by the log
    frame energy.
    """
    signal = np.asarray(signal)
    emphasised = np.append(signal[0], signal[1:] - preemphasis * signal[:-1]).astype(np.float64)
    frame_length, frame_step = _round_half_up(window_s * sample_rate), _round_half_up(step_s * sample_rate)
    count = 1 if len(emphasised) <= frame_length else 1 + math.ceil((len(emphasised) - frame_length) / frame_step)
    padded = np.concatenate([emphasised, np.zeros((count - 1) * frame_step + frame_length - len(emphasised))])
    frames = np.lib.stride_tricks.sliding_window_view(padded, frame_length)[::frame_step][:count]  # (count, 400)
    power = np.square(np.abs(np.fft.rfft(frames, nfft))) / nfft  # (count, 257)
    eps = np.finfo(float).eps
    energy = power.sum(axis=1)
    energy = np.where(energy == 0, eps, energy)
    bands = power @ _mel_filterbank(filters, nfft, sample_rate).T
    bands = np.where(bands == 0, eps, bands)
    cepstra = dct(np.log(bands), type=2, axis=1, norm="ortho")[:, :numcep]
    cepstra = cepstra * (1 + (lifter / 2.0) * np.sin(np.pi * np.arange(numcep) / lifter))
    cepstra[:, 0] = np.log(energy)
    return cepstra


# -- video ------------------------------------------------------------------------------------------------


def resample_indices(num_frames: int, fps: float, target_fps: float = SYNC_FPS) -> np.ndarray:
    """Source frame of each output frame at ``target_fps``: the one nearest in time (covers the same duration)."""
    count = max(1, round(num_frames * target_fps / fps))
    return np.minimum(np.floor(np.arange(count) * fps / target_fps + 0.5), num_frames - 1).astype(np.int64)


def crop_boxes(landmarks_px: np.ndarray) -> np.ndarray:
    """(T, N, 2) pixel landmarks -> (T, 3) crop boxes (centre x, centre y, half size), median-filtered over 13 frames.

    ``scipy.signal.medfilt`` zero-pads the ends, as in the reference; a track shorter than the filter (which
    the reference never sees: its tracks have 100+ frames) would get zero boxes, so it keeps its median box.
    """
    low, high = landmarks_px.min(axis=1), landmarks_px.max(axis=1)  # (T, 2) each
    half_size = np.maximum(high[:, 0] - low[:, 0], high[:, 1] - low[:, 1]) / 2
    centre = (low + high) / 2
    columns = np.stack([centre[:, 0], centre[:, 1], half_size], axis=1).astype(np.float64)
    if len(columns) < MEDIAN_FRAMES:
        return np.repeat(np.median(columns, axis=0, keepdims=True), len(columns), axis=0)
    return np.stack([medfilt(values, kernel_size=MEDIAN_FRAMES) for values in columns.T], axis=1)


def crop_faces(frames: np.ndarray, boxes: np.ndarray, crop_scale: float = 0.4, size: int = CROP_SIZE) -> np.ndarray:
    """uint8 (T, H, W, 3) frames and (T, 3) boxes -> (T, size, size, 3) face crops (run_pipeline.crop_video)."""
    crops = np.empty((len(frames), size, size, 3), dtype=np.uint8)
    for index, (frame, (centre_x, centre_y, half)) in enumerate(zip(frames, boxes)):
        pad = int(half * (1 + 2 * crop_scale))
        padded = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), mode="constant", constant_values=110)
        my, mx = centre_y + pad, centre_x + pad
        face = padded[int(my - half) : int(my + half * (1 + 2 * crop_scale)),
                      int(mx - half * (1 + crop_scale)) : int(mx + half * (1 + crop_scale))]
        crops[index] = cv2.resize(face, (size, size))
    return crops


# -- scores -----------------------------------------------------------------------------------------------


@dataclass
class SyncScores:
    lse_d: float  # smallest mean distance over offsets (lower is better)
    lse_c: float  # median minus smallest mean distance (higher is better)
    offset: int  # AV offset in frames at 25 fps
    windows: int  # 5-frame video windows compared
    mean_distances: np.ndarray  # (2 vshift + 1,) mean distance per offset


class SyncMetric:
    """LSE-D / LSE-C / AV offset of one video, batched over windows, on CPU or GPU."""

    def __init__(self, model: SyncNet, device: str | torch.device = "cpu", batch_size: int = 64, vshift: int = 15):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.vshift = vshift

    @torch.no_grad()
    def features(self, crops_bgr: np.ndarray, audio_pcm16: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, 224, 224, 3) uint8 BGR crops at 25 fps and int16 16 kHz audio -> lip and audio features (L, 1024)."""
        cepstra = torch.from_numpy(mfcc(audio_pcm16, SAMPLE_RATE).T.copy()).float()  # (13, M)
        windows = min(len(crops_bgr), len(audio_pcm16) // (SAMPLE_RATE // SYNC_FPS)) - WINDOW_FRAMES
        if windows <= 0:
            raise ValueError(f"{len(crops_bgr)} frames / {len(audio_pcm16) / SAMPLE_RATE:.2f} s of audio at 25 fps: "
                             f"SyncNet needs at least {WINDOW_FRAMES + 1} frames and 0.24 s")
        video = torch.from_numpy(crops_bgr)
        lip_features, audio_features = [], []
        for start in range(0, windows, self.batch_size):
            starts = range(start, min(windows, start + self.batch_size))
            clips = torch.stack([video[i : i + WINDOW_FRAMES] for i in starts]).to(self.device)  # (b, 5, 224, 224, 3)
            lips = clips.permute(0, 4, 1, 2, 3).float()  # (b, 3, 5, 224, 224)
            sounds = torch.stack([cepstra[:, i * MFCC_PER_FRAME : i * MFCC_PER_FRAME + MFCC_WINDOW] for i in starts])
            lip_features.append(self.model.forward_lip(lips).float().cpu())
            audio_features.append(self.model.forward_aud(sounds[:, None].to(self.device)).float().cpu())  # (b, 1, 13, 20)
        return torch.cat(lip_features), torch.cat(audio_features)

    def offsets_distances(self, lip_features: torch.Tensor, audio_features: torch.Tensor) -> torch.Tensor:
        """calc_pdist: (L, 2 vshift + 1) distance of each lip window to the audio windows shifted -vshift..vshift."""
        span = 2 * self.vshift + 1
        padded = F.pad(audio_features, (0, 0, self.vshift, self.vshift))  # zero features beyond the ends
        shifted = padded.unfold(0, span, 1).permute(0, 2, 1)  # (L, span, d)
        return F.pairwise_distance(lip_features[:, None, :].expand_as(shifted), shifted)

    def __call__(self, crops_bgr: np.ndarray, audio_pcm16: np.ndarray) -> SyncScores:
        lip_features, audio_features = self.features(crops_bgr, audio_pcm16)
        mean_distances = self.offsets_distances(lip_features, audio_features).mean(dim=0)
        smallest, index = torch.min(mean_distances, 0)
        return SyncScores(lse_d=float(smallest), lse_c=float(torch.median(mean_distances) - smallest),
                          offset=int(self.vshift - index), windows=len(lip_features),
                          mean_distances=mean_distances.numpy())
