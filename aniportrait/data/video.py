"""Video I/O: decord for reading frames, PyAV (FFmpeg) for probing and for writing H.264 mp4 with audio.

Writers are atomic: frames go to a temporary file beside the target, renamed onto it on ``close()``;
an exception inside a ``with VideoWriter(...)`` block leaves no file behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from aniportrait.errors import AniPortraitError
from aniportrait.utils.atomic import temporary_name

__all__ = ["FrameSink", "VideoInfo", "probe_video", "read_video", "VideoWriter", "write_video"]


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    fps: float
    frames: int
    width: int
    height: int
    duration_s: float
    has_audio: bool
    rotation: int = 0  # degrees clockwise to display upright (phone videos)
    variable_frame_rate: bool = False


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Stream facts of a video file; raises AniPortraitError naming the file when it is unreadable."""
    import av

    path = Path(path)
    if not path.is_file():
        raise AniPortraitError(f"video file not found: {path}; check the path")
    try:
        with av.open(str(path)) as container:
            video = next((s for s in container.streams if s.type == "video"), None)
            if video is None:
                raise AniPortraitError(f"{path} has no video stream; give a video file (mp4, mov, mkv, ...)")
            has_audio = any(s.type == "audio" for s in container.streams)
            average_rate = video.average_rate or video.guessed_rate or Fraction(25)
            base_rate = video.base_rate or average_rate
            fps = float(average_rate)
            if video.duration is not None and video.time_base is not None:
                duration = float(video.duration * video.time_base)
            elif container.duration:
                duration = container.duration / 1_000_000
            else:
                duration = 0.0
            frames = video.frames or int(round(duration * fps))
            rotation = _display_rotation(container, video)
            variable = abs(float(base_rate) - fps) > 0.01 * fps
            return VideoInfo(path, fps, int(frames), video.codec_context.width, video.codec_context.height,
                             duration, has_audio, rotation, variable)
    except AniPortraitError:
        raise
    except Exception as error:  # noqa: BLE001 - FFmpeg raises many types for broken files
        raise AniPortraitError(f"cannot read video {path} ({error}); the file is corrupt or not a video") from error


def _display_rotation(container, stream) -> int:
    """Clockwise degrees to show the video upright (phone videos): the first frame's display matrix."""
    try:
        frame = next(container.decode(stream))
        rotation = int(round(getattr(frame, "rotation", 0) or 0))
    except (StopIteration, ValueError, OSError):
        return 0
    finally:
        container.seek(0)
    return (-rotation) % 360  # FFmpeg reports the counter-clockwise angle


def read_video(
    path: str | os.PathLike,
    indices: list[int] | np.ndarray | None = None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """RGB uint8 frames (T, H, W, 3) with decord; ``indices`` picks frames, ``size`` = (height, width)."""
    import decord

    path = Path(path)
    if not path.is_file():
        raise AniPortraitError(f"video file not found: {path}; check the path")
    try:
        kwargs = {} if size is None else {"height": int(size[0]), "width": int(size[1])}
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1, **kwargs)
        if indices is None:
            indices = np.arange(len(reader))
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(reader)):
            raise AniPortraitError(f"{path}: frame index out of range (video has {len(reader)} frames)")
        return reader.get_batch(list(indices)).asnumpy()
    except AniPortraitError:
        raise
    except Exception as error:  # noqa: BLE001 - decord raises DECORDError and RuntimeError
        raise AniPortraitError(f"cannot decode video {path} ({error}); the file is corrupt or truncated") from error


class FrameSink:
    """What every H.264 writer here shares: a context manager that keeps the file only when the block succeeds
    (``close``) and discards it otherwise (``abort``), and the checks on what ``write`` is given."""

    path: Path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def close(self) -> Path:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def _frame_batch(self, frames: np.ndarray) -> np.ndarray:
        """``frames`` as a (T, H, W, 3) uint8 batch of even size, or one error naming what is wrong."""
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.dtype != np.uint8 or frames.shape[-1] != 3:
            raise AniPortraitError(f"{type(self).__name__} expects uint8 RGB frames (..., H, W, 3), got "
                                   f"{frames.shape} {frames.dtype}")
        height, width = frames.shape[1:3]
        if height % 2 or width % 2:
            raise AniPortraitError(f"H.264 needs even frame sizes; got {width}x{height} for {self.path}")
        return frames


class VideoWriter(FrameSink):
    """Write RGB frames as H.264 (yuv420p) mp4, optionally muxing 16 kHz mono audio as AAC.

    >>> with VideoWriter("out.mp4", fps=30) as writer:
    ...     writer.write(frames)          # (T, H, W, 3) or (H, W, 3) uint8
    ...     writer.set_audio(samples)     # float32 mono at 16 kHz, muxed at close
    """

    def __init__(self, path: str | os.PathLike, fps: float, crf: int = 18, preset: str = "medium",
                 audio_sample_rate: int = 16_000, threads: int = 1, gop_size: int | None = None):
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(1001)
        self.crf = crf
        self.preset = preset
        # at most this many frames from one keyframe to the next (x264 ``g``; None: x264's 250). Reading frame k
        # decodes from the keyframe before it, so short intervals make random frame access (training) cheap.
        if gop_size is not None and gop_size < 1:
            raise AniPortraitError(f"gop_size={gop_size}: use a positive frame count or None")
        self.gop_size = gop_size
        self.threads = threads
        self.audio_sample_rate = audio_sample_rate
        self._audio: np.ndarray | None = None
        self._container = None
        self._stream = None
        self.frames_written = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temporary_name(self.path if self.path.suffix else self.path.with_suffix(".mp4"))

    def _open(self, height: int, width: int) -> None:
        import av

        self._container = av.open(str(self._tmp), mode="w", format="mp4")
        stream = self._container.add_stream("libx264", rate=self.fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(self.crf), "preset": self.preset,
                          **({"g": str(self.gop_size)} if self.gop_size else {})}
        stream.codec_context.thread_count = self.threads
        self._stream = stream
        self._audio_stream = None

    def set_audio(self, samples: np.ndarray | None) -> None:
        """Mono float32 audio at ``audio_sample_rate``, muxed when the writer closes (call before ``write``)."""
        if self._container is not None:
            raise AniPortraitError("VideoWriter.set_audio must be called before the first frame is written")
        self._audio = None if samples is None else np.asarray(samples, dtype=np.float32).reshape(-1)

    def write(self, frames: np.ndarray) -> None:
        import av

        frames = self._frame_batch(frames)
        if self._container is None:
            self._open(frames.shape[1], frames.shape[2])
            if self._audio is not None:
                self._add_audio_stream()
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in self._stream.encode(video_frame):
                self._container.mux(packet)
            self.frames_written += 1

    def _add_audio_stream(self) -> None:
        self._audio_stream = self._container.add_stream("aac", rate=self.audio_sample_rate)
        self._audio_stream.layout = "mono"

    def _mux_audio(self) -> None:
        import av

        stream = self._audio_stream
        frame_size = stream.codec_context.frame_size or 1024
        audio = self._audio
        for start in range(0, len(audio), frame_size):
            chunk = audio[start : start + frame_size]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            frame.sample_rate = self.audio_sample_rate
            frame.pts = start
            for packet in stream.encode(frame):
                self._container.mux(packet)
        for packet in stream.encode(None):
            self._container.mux(packet)

    def close(self) -> Path:
        if self._container is None:
            raise AniPortraitError(f"no frames were written to {self.path}; nothing to save")
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        if self._audio_stream is not None and self._audio is not None and len(self._audio):
            self._mux_audio()
        self._container.close()
        self._container = None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - best effort while unwinding another error
                pass
            self._container = None
        self._tmp.unlink(missing_ok=True)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, audio: np.ndarray | None = None,
                crf: int = 18, preset: str = "medium", gop_size: int | None = None) -> Path:
    """Write all frames (T, H, W, 3) uint8 RGB in one call; see :class:`VideoWriter`."""
    with VideoWriter(path, fps, crf=crf, preset=preset, gop_size=gop_size) as writer:
        writer.set_audio(audio)
        writer.write(frames)
    return Path(path)
