"""Training windows for the audio-to-landmark stage: aligned speech and per-frame meshes and poses.

A sample is ``window_frames`` consecutive video frames (resampled to the model's fps) with the audio that
covers them, normalised over the whole clip as at inference (wav2vec2 feature-extractor normalisation):

    audio          (S,)          normalised 16 kHz samples, S = round(window_frames * 16000 / fps)
    mesh           (W, 468, 3)   ground-truth canonical meshes
    reference_mesh (468, 3)      the clip's neutral mesh (targets are mesh - reference_mesh)
    poses          (W, 6)        head pose relative to the window's first valid frame
    frame_mask     (W,)          True for frames with a face and inside the clip (padding is False)
    audio_mask     (W,)          True for frames inside the clip (the encoder ignores padding)
    identity       ()            index into the identity embedding (Audio2Pose)

Training windows are drawn at random but deterministically per index (the same index always gives the
same window), so runs are reproducible and shard cleanly across processes.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from aniportrait.audio.io import SAMPLE_RATE, load_audio, normalize_for_wav2vec2
from aniportrait.data.clip import ClipRecord, Manifest, load_landmarks
from aniportrait.errors import AniPortraitError
from aniportrait.face.geometry import relative_pose6
from aniportrait.face.topology import LEFT_EYE_POLYGON, RIGHT_EYE_POLYGON
from aniportrait.metrics.landmarks import mouth_opening

__all__ = ["AudioLandmarkDataModule", "AudioWindowDataset", "ClipArrays", "choose_reference_frame", "identity_map"]

log = logging.getLogger(__name__)


def choose_reference_frame(mesh3d: np.ndarray, valid: np.ndarray, rule: str = "neutral") -> int:
    """Index of the frame whose mesh serves as the clip's reference (offsets are measured from it).

    ``neutral``: among valid frames whose inner-lip gap is in the lowest 10 %, the one with the widest
    open eyes (closed mouth, no blink). ``first``: the first valid frame.
    """
    candidates = np.flatnonzero(valid)
    if len(candidates) == 0:
        raise ValueError("clip has no valid frame")
    if rule == "first":
        return int(candidates[0])
    if rule != "neutral":
        raise AniPortraitError(f"unknown mesh_reference rule {rule!r}; use 'neutral' or 'first'")
    gaps = mouth_opening(mesh3d[candidates])
    closed = candidates[gaps <= np.quantile(gaps, 0.1)]
    eye_height = sum(np.ptp(mesh3d[closed][:, list(ring), 1], axis=1) for ring in (LEFT_EYE_POLYGON, RIGHT_EYE_POLYGON))
    return int(closed[int(np.argmax(eye_height))])


def identity_map(manifest: Manifest, num_identities: int = 100) -> dict[str, int]:
    """Identity name -> embedding index (sorted names; folded modulo ``num_identities`` when there are more)."""
    names = manifest.identities()
    if len(names) > num_identities:
        log.warning("%d identities but the pose model embeds %d: indices are folded modulo %d",
                    len(names), num_identities, num_identities)
    return {name: index % num_identities for index, name in enumerate(names)}


@dataclass
class ClipArrays:
    """One clip resampled to the model's fps."""

    record: ClipRecord
    audio: np.ndarray  # (S,) normalised
    mesh3d: np.ndarray  # (T, 468, 3)
    trans_mat: np.ndarray  # (T, 4, 4)
    valid: np.ndarray  # (T,)
    reference_index: int

    @property
    def frames(self) -> int:
        return self.mesh3d.shape[0]


def load_clip_arrays(root: Path, record: ClipRecord, fps: float, mesh_reference: str) -> ClipArrays:
    if record.audio is None:
        raise AniPortraitError(f"clip {record.id} has no audio; the audio stage needs speech (use video+audio clips)")
    landmarks = load_landmarks(root / record.landmarks, frames=record.frames)
    audio = normalize_for_wav2vec2(load_audio(root / record.audio))
    # Resample the frame axis to the model's fps (nearest source frame for each target frame).
    target_frames = math.floor(record.frames * fps / record.fps + 1e-6)
    source_index = np.minimum(np.round(np.arange(target_frames) * record.fps / fps).astype(int), record.frames - 1)
    mesh3d = landmarks["mesh3d"][source_index]
    valid = landmarks["valid"][source_index] & np.isfinite(mesh3d).all(axis=(1, 2))
    return ClipArrays(
        record=record,
        audio=audio,
        mesh3d=mesh3d,
        trans_mat=landmarks["trans_mat"][source_index].astype(np.float64),
        valid=valid,
        reference_index=choose_reference_frame(mesh3d, valid, mesh_reference),
    )


class AudioWindowDataset(Dataset):
    """Windows over the clips of one split. ``random_windows``: deterministic random windows per index
    (``length`` of them); otherwise consecutive windows covering every clip (validation, test)."""

    def __init__(self, root: Path, records: list[ClipRecord], fps: float, window_frames: int,
                 identities: dict[str, int], mesh_reference: str = "neutral", random_windows: bool = True,
                 length: int = 10_000, seed: int = 0, cache_clips: int = 256):
        if not records:
            raise AniPortraitError(f"{root}: this split has no clips with audio")
        self.root, self.records, self.fps = Path(root), records, float(fps)
        self.window_frames, self.identities = int(window_frames), identities
        self.mesh_reference, self.random_windows = mesh_reference, random_windows
        self.length, self.seed = int(length), int(seed)
        self.samples_per_frame = SAMPLE_RATE / self.fps
        self._cache: OrderedDict[int, ClipArrays] = OrderedDict()
        self._cache_size = cache_clips
        clip_frames = np.array([math.floor(r.frames * self.fps / r.fps + 1e-6) for r in records])
        self._weights = clip_frames / clip_frames.sum()
        self._fixed: list[tuple[int, int]] = []
        if not random_windows:
            for clip_index, frames in enumerate(clip_frames):
                self._fixed.extend((clip_index, start) for start in range(0, max(int(frames), 1), self.window_frames))

    def __len__(self) -> int:
        return self.length if self.random_windows else len(self._fixed)

    def clip(self, index: int) -> ClipArrays:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        arrays = load_clip_arrays(self.root, self.records[index], self.fps, self.mesh_reference)
        self._cache[index] = arrays
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return arrays

    def _window(self, index: int) -> tuple[int, int]:
        if not self.random_windows:
            return self._fixed[index]
        rng = np.random.default_rng((self.seed, index))
        clip_index = int(rng.choice(len(self.records), p=self._weights))
        frames = math.floor(self.records[clip_index].frames * self.fps / self.records[clip_index].fps + 1e-6)
        start = int(rng.integers(0, max(frames - self.window_frames, 0) + 1))
        return clip_index, start

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        clip_index, start = self._window(index)
        clip = self.clip(clip_index)
        window = self.window_frames
        stop = min(start + window, clip.frames)
        frames = np.arange(start, stop)
        mask = np.zeros(window, dtype=bool)
        mask[: len(frames)] = clip.valid[frames]
        inside = np.zeros(window, dtype=bool)
        inside[: len(frames)] = True
        mesh = np.zeros((window, *clip.mesh3d.shape[1:]), dtype=np.float32)
        mesh[: len(frames)] = clip.mesh3d[frames]
        poses = np.zeros((window, 6), dtype=np.float32)
        if mask.any():
            first_valid = frames[int(np.argmax(clip.valid[frames]))]
            poses[: len(frames)] = relative_pose6(clip.trans_mat[frames], clip.trans_mat[first_valid])
        samples = round(window * self.samples_per_frame)
        audio_start = round(start * self.samples_per_frame)
        audio = np.zeros(samples, dtype=np.float32)
        chunk = clip.audio[audio_start : audio_start + samples]
        audio[: len(chunk)] = chunk
        return {
            "audio": torch.from_numpy(audio),
            "mesh": torch.from_numpy(mesh),
            "reference_mesh": torch.from_numpy(clip.mesh3d[clip.reference_index].astype(np.float32)),
            "poses": torch.from_numpy(poses),
            "frame_mask": torch.from_numpy(mask),
            "audio_mask": torch.from_numpy(inside),
            "identity": torch.tensor(self.identities.get(clip.record.identity, 0), dtype=torch.long),
            "clip_index": torch.tensor(clip_index),
            "start": torch.tensor(start),
        }


class AudioLandmarkDataModule(pl.LightningDataModule):
    """Stage-A data: random training windows and covering validation/test windows of a clip dataset.

    ``source`` is a ``data`` config object (``resolve()`` -> dataset root, generating the synthetic set on
    first use; runs once, on global rank 0, in ``prepare_data``).
    """

    def __init__(self, source, fps: float | None = None, window_frames: int = 60, eval_window_frames: int = 150,
                 batch_size: int = 8, eval_batch_size: int = 4, num_workers: int = 0, samples_per_epoch: int = 10_000,
                 mesh_reference: str = "neutral", num_identities: int = 100, seed: int = 0, pin_memory: bool = False):
        super().__init__()
        self.source = source
        self.fps = fps
        self.window_frames, self.eval_window_frames = window_frames, eval_window_frames
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.samples_per_epoch, self.mesh_reference = samples_per_epoch, mesh_reference
        self.num_identities, self.seed = num_identities, seed
        self.root: Path | None = None
        self.identities: dict[str, int] = {}
        self.datasets: dict[str, AudioWindowDataset] = {}

    def prepare_data(self) -> None:
        self.source.resolve()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.root = self.source.resolve()
        manifest = Manifest.load(self.root)
        with_audio = [r for r in manifest if r.audio is not None]
        if not with_audio:
            raise AniPortraitError(f"{self.root}: no clip has audio; the audio stage needs speech")
        if self.fps is None:
            fps_values, counts = np.unique([r.fps for r in with_audio], return_counts=True)
            self.fps = float(fps_values[np.argmax(counts)])
        self.identities = identity_map(manifest, self.num_identities)
        for split in ("train", "val", "test"):
            records = [r for r in with_audio if r.split == split]
            if not records:
                continue
            training = split == "train"
            self.datasets[split] = AudioWindowDataset(
                self.root, records, self.fps, self.window_frames if training else self.eval_window_frames,
                self.identities, self.mesh_reference, random_windows=training,
                length=self.samples_per_epoch, seed=self.seed,
            )
        if "train" not in self.datasets:
            raise AniPortraitError(f"{self.root}: the manifest has no train clips with audio")
        if "val" not in self.datasets:
            log.warning("%s has no val clips: validating on windows covering the train clips", self.root)
            self.datasets["val"] = AudioWindowDataset(
                self.root, self.datasets["train"].records, self.fps, self.eval_window_frames, self.identities,
                self.mesh_reference, random_windows=False, seed=self.seed,
            )

    def _loader(self, split: str, batch_size: int, sampler=None, drop_last: bool = True) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                          drop_last=drop_last and sampler is not None)

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        # Index i always gives the same random window, so reading indices in order is already a random
        # stream. Starting at the samples already consumed makes a resumed run see exactly the batches an
        # uninterrupted one would. Each process takes every world_size-th index, so the union of the local
        # batches is the batch one process would read with world_size times the batch size (the trainer
        # configs set use_distributed_sampler: false; this sampler does the sharding).
        rank, world = self._rank()
        consumed = 0
        if self.trainer is not None:
            consumed = self.trainer.global_step * self.trainer.accumulate_grad_batches * self.batch_size * world
        indices = range(consumed + rank, len(self.datasets["train"]), world)
        return self._loader("train", self.batch_size, sampler=indices)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        return self._loader("val", self.eval_batch_size, sampler=range(rank, len(self.datasets["val"]), world),
                            drop_last=False)

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.datasets:
            raise AniPortraitError(f"{self.root}: the manifest has no test clips")
        rank, world = self._rank()
        return self._loader("test", self.eval_batch_size, sampler=range(rank, len(self.datasets["test"]), world),
                            drop_last=False)
