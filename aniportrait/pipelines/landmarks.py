"""Stage A inference: speech -> per-frame meshes and head poses -> 2-D landmarks -> pose images.

Audio of any length:

* Audio2Mesh runs over overlapping chunks (``mesh_chunk_seconds``, cross-faded over
  ``mesh_overlap_seconds``), so memory stays bounded for minutes of speech.
* Audio2Pose decodes in chunks of ``chunk_frames`` (the window length it was trained on); each chunk after
  the first re-encodes the last ``context_frames`` of the previous one and teacher-forces their poses, so
  the head continues smoothly instead of snapping back to the rest pose at every chunk (the official code
  restarts every 5 s chunk from zero). Poses are then scaled (``rotation_scale``) and smoothed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aniportrait.audio.io import SAMPLE_RATE, frame_count, normalize_for_wav2vec2
from aniportrait.face.drawing import draw_landmark_sequence
from aniportrait.face.geometry import matrix_to_pose6, pose6_to_matrix, project_points, smooth_pose_sequence

__all__ = ["LandmarkPrediction", "AudioToLandmarks", "predict_poses_chunked", "predict_offsets_chunked", "render_pose_images"]


def _segment(audio: torch.Tensor, start_frame: int, stop_frame: int, fps: float) -> torch.Tensor:
    """Samples covering frames [start, stop), zero-padded to exactly (stop - start) frames of audio."""
    per_frame = SAMPLE_RATE / fps
    begin, length = round(start_frame * per_frame), round((stop_frame - start_frame) * per_frame)
    chunk = audio[..., begin : begin + length]
    if chunk.shape[-1] < length:
        chunk = torch.nn.functional.pad(chunk, (0, length - chunk.shape[-1]))
    return chunk


@torch.no_grad()
def predict_offsets_chunked(model, audio: torch.Tensor, num_frames: int, fps: float,
                            chunk_seconds: float = 20.0, overlap_seconds: float = 1.0) -> torch.Tensor:
    """(B, S) normalised audio -> (B, T, 1404) mesh offsets, linearly cross-faded where chunks overlap."""
    chunk = max(1, round(chunk_seconds * fps))
    overlap = min(round(overlap_seconds * fps), chunk // 2)
    if num_frames <= chunk:
        return model(audio, num_frames)
    output = None
    weight_sum = torch.zeros(num_frames, device=audio.device)
    start = 0
    while True:
        stop = min(start + chunk, num_frames)
        piece = model(_segment(audio, start, stop, fps), stop - start)  # (B, n, 1404)
        if output is None:
            output = piece.new_zeros(piece.shape[0], num_frames, piece.shape[-1])
        ramp = torch.ones(stop - start, device=audio.device)
        if start > 0 and overlap:
            ramp[:overlap] = torch.linspace(0, 1, overlap + 2, device=audio.device)[1:-1]
        if stop < num_frames and overlap:
            ramp[-overlap:] = torch.linspace(1, 0, overlap + 2, device=audio.device)[1:-1]
        output[:, start:stop] += piece * ramp[None, :, None]
        weight_sum[start:stop] += ramp
        if stop == num_frames:
            break
        start = stop - overlap
    return output / weight_sum[None, :, None]


@torch.no_grad()
def predict_poses_chunked(model, audio: torch.Tensor, num_frames: int, identity: torch.Tensor, fps: float,
                          chunk_frames: int = 150, context_frames: int = 10) -> np.ndarray:
    """(B, S) normalised audio -> (B, T, 6) poses relative to the first frame, decoded chunk by chunk."""
    chunk_frames = min(int(chunk_frames), model.config.max_frames)
    context_frames = max(0, min(int(context_frames), chunk_frames - 1))
    batch = audio.shape[0]
    poses = np.zeros((batch, num_frames, 6))
    start = 0
    while start < num_frames:
        context = 0 if start == 0 else min(context_frames, start)
        first = start - context
        stop = min(first + chunk_frames, num_frames)
        prefix = None
        anchor = pose6_to_matrix(poses[:, first]) if first > 0 else np.tile(np.eye(4), (batch, 1, 1))  # (B, 4, 4)
        if context:
            relative = matrix_to_pose6(np.linalg.inv(anchor)[:, None] @ pose6_to_matrix(poses[:, first:start]))
            prefix = torch.as_tensor(relative, dtype=audio.dtype, device=audio.device)
        relative_out = model.infer(_segment(audio, first, stop, fps), stop - first, identity, prefix_poses=prefix)
        absolute = matrix_to_pose6(anchor[:, None] @ pose6_to_matrix(relative_out.double().cpu().numpy()))
        poses[:, start:stop] = absolute[:, context:]
        start = stop
    return poses


@dataclass
class LandmarkPrediction:
    meshes: np.ndarray  # (T, 468, 3) canonical meshes (reference mesh + predicted offsets)
    poses: np.ndarray  # (T, 6) relative to the reference frame's trans_mat
    fps: float


def resolve_identity(identity: int | str | None, pose_settings: dict, count: int) -> int:
    """Audio2Pose's identity index: None -> the bundle's default; a training identity's name -> its index; an index
    checked against the ``count`` identities the model was trained with."""
    from aniportrait.errors import AniPortraitError
    from aniportrait.utils import values

    if identity is None:
        return int(pose_settings.get("default_identity", 0))
    if isinstance(identity, str) and not identity.strip().isdigit():
        table = pose_settings.get("identities", {})
        if identity not in table:
            known = ", ".join(sorted(table)[:10]) + (" ..." if len(table) > 10 else "") if table else "no names"
            raise AniPortraitError(f"identity={identity!r} is not a training identity of this bundle ({known}); give "
                                   f"one of those names or an index 0-{count - 1}")
        return int(table[identity])
    return values.integer("identity", identity, minimum=0, maximum=count - 1,
                          hint=f" (this bundle's Audio2Pose knows {count} identities), or a training identity name")


class AudioToLandmarks:
    """Audio2Mesh (+ Audio2Pose) with the settings a bundle stores (``settings["audio"]``)."""

    def __init__(self, audio2mesh, audio2pose=None, settings: dict | None = None, device: str | torch.device = "cpu"):
        self.audio2mesh = audio2mesh
        self.audio2pose = audio2pose
        self.settings = settings or {}
        self.device = torch.device(device)
        self.fps = float(self.settings.get("fps", 30.0))

    @classmethod
    def from_bundle(cls, bundle, device: str | torch.device = "cpu") -> AudioToLandmarks:
        bundle.require("audio2mesh", purpose="audio-driven landmarks")
        audio2pose = bundle.load("audio2pose", device) if bundle.has("audio2pose") else None
        return cls(bundle.load("audio2mesh", device), audio2pose, bundle.settings.get("audio", {}), device)

    def identity_index(self, identity: int | str | None) -> int:
        count = int(self.audio2pose.id_embed.num_embeddings) if self.audio2pose is not None else 100
        return resolve_identity(identity, self.settings.get("pose", {}), count)

    @torch.no_grad()
    def predict(self, audio: np.ndarray, reference_mesh: np.ndarray, identity: int | str | None = None,
                num_frames: int | None = None, pose_overrides: dict | None = None) -> LandmarkPrediction:
        """audio: 16 kHz mono float32 (not normalised). Returns meshes and poses for ceil(duration * fps) frames."""
        frames = frame_count(len(audio), self.fps) if num_frames is None else int(num_frames)
        values = torch.from_numpy(normalize_for_wav2vec2(audio))[None].to(self.device)
        offsets = predict_offsets_chunked(self.audio2mesh, values, frames, self.fps)[0]
        meshes = np.asarray(reference_mesh, dtype=np.float32)[None] + offsets.float().cpu().numpy().reshape(frames, -1, 3)
        pose_settings = {**self.settings.get("pose", {}), **(pose_overrides or {})}
        if self.audio2pose is None:
            poses = np.zeros((frames, 6))
        else:
            identity_tensor = torch.tensor([self.identity_index(identity)], device=self.device)
            poses = predict_poses_chunked(self.audio2pose, values, frames, identity_tensor, self.fps,
                                          pose_settings.get("chunk_frames", 150), pose_settings.get("context_frames", 10))[0]
            poses[:, :3] *= float(pose_settings.get("rotation_scale", 1.0))
            window = int(pose_settings.get("smooth_window", 0))
            if window > 1:
                poses = smooth_pose_sequence(poses, window)
        return LandmarkPrediction(meshes=meshes, poses=poses, fps=self.fps)


def render_pose_images(meshes: np.ndarray, trans_mat: np.ndarray, poses: np.ndarray | None,
                       image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Project meshes with the portrait's camera and draw them: returns (T, 468, 2) pixels and
    (T, H, W, 3) uint8 pose images (the official visualizer's look)."""
    pixels = project_points(meshes, trans_mat, poses, image_size)
    return pixels, draw_landmark_sequence(pixels, image_size)
