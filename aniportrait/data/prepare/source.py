"""One source video: its streams, its frame times, and the constant-rate output timeline built on them.

decord decodes the frames (upright: it applies the rotation metadata of phone videos itself) and gives
each frame's presentation time, so variable frame rate videos are resampled by time, not by index.
PyAV supplies what decord does not: the audio track's presence and start time, the rotation, and the
video stream's start time (decord's frame times start at zero; the audio is aligned through it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aniportrait.audio.io import SAMPLE_RATE
from aniportrait.data.video import probe_video
from aniportrait.errors import AniPortraitError

__all__ = [
    "SourceVideo", "open_source", "output_timeline", "read_frames", "chunk_frames", "audio_for_frames", "DecodeError",
]

_CHUNK_BYTES = 256 * 1024 * 1024  # decoded frames held at once per worker (a 4K frame is 25 MB)


class DecodeError(Exception):
    """decord failed part-way through a file (truncated or damaged data)."""


def _decord_message(error: Exception) -> str:
    """decord's first error line without its ``[time] source.cc:line:`` prefix."""
    line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return re.sub(r"^\[[\d:]+\] \S+:\d+: (Error: )?", "", line)[:200]


@dataclass
class SourceVideo:
    path: Path
    key: str  # path relative to the input folder, posix style
    fps: float  # average frame rate of the file
    width: int  # of the decoded, upright frames
    height: int
    frames: int  # frames decord can index
    duration_s: float
    has_audio: bool
    rotation: int  # degrees of the display rotation decord applied (0 for most files)
    variable_frame_rate: bool
    frame_starts: np.ndarray  # (frames,) float64 seconds from the first frame
    video_start_s: float  # presentation time of the first frame in the file's clock
    audio_start_s: float  # of the first audio sample in the file's clock (0 without audio)


def _stream_starts_and_rotation(path: Path) -> tuple[float, float, int]:
    import av

    with av.open(str(path)) as container:
        video = container.streams.video[0]
        video_start = float(video.start_time * video.time_base) if video.start_time is not None else 0.0
        audio_streams = [s for s in container.streams if s.type == "audio"]
        audio_start = 0.0
        if audio_streams and audio_streams[0].start_time is not None:
            audio_start = float(audio_streams[0].start_time * audio_streams[0].time_base)
        rotation = 0
        for frame in container.decode(video=0):
            rotation = int(round(getattr(frame, "rotation", 0) or 0)) % 360
            break
    return video_start, audio_start, rotation


def open_source(path: Path, key: str):
    """Probe a video and open it with decord; returns (SourceVideo, decord.VideoReader).

    Raises AniPortraitError (naming the file) when it cannot be read at all.
    """
    import decord

    info = probe_video(path)
    try:
        video_start, audio_start, rotation = _stream_starts_and_rotation(path)
    except Exception as error:  # noqa: BLE001 - FFmpeg raises many types for damaged files
        raise AniPortraitError(f"cannot decode video {path} ({error}); the file is corrupt or truncated") from error
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        frames = len(reader)
        times = reader.get_frame_timestamp(range(frames)).astype(np.float64) if frames else np.zeros((0, 2))
        first = reader[0].asnumpy() if frames else None
    except Exception as error:  # noqa: BLE001 - decord raises DECORDError and RuntimeError
        raise AniPortraitError(
            f"cannot decode video {path} ({_decord_message(error)}); the file is truncated or damaged: "
            "download it again or remux it (ffmpeg -i IN -c copy OUT)"
        ) from error
    if frames == 0 or first is None:
        raise AniPortraitError(f"{path} holds no video frames")
    source = SourceVideo(
        path=path,
        key=key,
        fps=float(reader.get_avg_fps()),
        width=int(first.shape[1]),
        height=int(first.shape[0]),
        frames=frames,
        duration_s=float(times[-1, 1] - times[0, 0]),
        has_audio=info.has_audio,
        rotation=rotation,
        variable_frame_rate=info.variable_frame_rate,
        frame_starts=times[:, 0] - times[0, 0],
        video_start_s=video_start,
        audio_start_s=audio_start,
    )
    return source, reader


def output_timeline(source: SourceVideo, fps: float, max_seconds: float | None = None) -> np.ndarray:
    """(N,) source frame index of each output frame: the frame nearest in time to ``k / fps``."""
    duration = source.duration_s if max_seconds is None else min(source.duration_s, max_seconds)
    count = int(np.floor(duration * fps + 1e-6))
    times = np.arange(count) / fps
    starts = source.frame_starts
    after = np.clip(np.searchsorted(starts, times), 0, len(starts) - 1)
    before = np.clip(after - 1, 0, len(starts) - 1)
    take_before = np.abs(times - starts[before]) < np.abs(starts[after] - times)
    return np.where(take_before, before, after).astype(np.int64)


def chunk_frames(source: SourceVideo, most: int = 32) -> int:
    """Frames to decode at once: at most ``most``, fewer for large frames (bounded memory per worker)."""
    return int(max(1, min(most, _CHUNK_BYTES // (source.width * source.height * 3))))


def read_frames(reader, indices: np.ndarray) -> np.ndarray:
    """RGB frames (len(indices), H, W, 3) for source indices (repeats allowed); DecodeError on damage."""
    unique, inverse = np.unique(indices, return_inverse=True)
    try:
        batch = reader.get_batch([int(i) for i in unique]).asnumpy()
    except Exception as error:  # noqa: BLE001 - decord raises DECORDError and RuntimeError
        raise DecodeError(_decord_message(error)) from error
    return batch if len(unique) == len(indices) else batch[inverse]


def audio_for_frames(audio: np.ndarray, source: SourceVideo, fps: float, start_frame: int, frames: int) -> np.ndarray:
    """The 16 kHz samples that play with output frames [start_frame, start_frame + frames).

    Exactly ``round(frames * 16000 / fps)`` samples, zero-padded where the track is shorter or starts late.
    """
    length = int(round(frames * SAMPLE_RATE / fps))
    offset = source.video_start_s - source.audio_start_s  # audio time of the first video frame
    first = int(round((start_frame / fps + offset) * SAMPLE_RATE))
    clip = np.zeros(length, dtype=np.float32)
    lo, hi = max(first, 0), min(first + length, len(audio))
    if hi > lo:
        clip[lo - first : hi - first] = audio[lo:hi]
    return clip
