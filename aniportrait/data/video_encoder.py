"""H.264 encoding in a child process: :class:`VideoWriter`'s file, without holding the caller's interpreter.

Stage B hands its frames to the encoder while the same process launches GPU work. Encoded on a thread of the same
process (PyAV), every frame needs the interpreter lock back a few times, and each time waits up to Python's switch
interval for the thread that launches kernels. Measured on a 2-core machine beside one busy Python thread
(``benchmarks/encoder_contention.py``): a 512 x 512 frame took 29.4 ms to encode on a thread (8.4 ms alone) and
12.3 ms in a child process (11.1 ms alone, the pipe included), and the busy thread kept 96.5 % of its speed
against 91.3 %. :class:`EncoderProcess` runs :class:`VideoWriter` in
``python -m aniportrait.data.video_encoder`` and feeds it through a pipe: the same bytes on disk, the same
atomic write (the file appears only when ``close`` succeeds), and the child's error, if any, raised in the caller.

Protocol on the child's stdin: a type byte, then ``F`` + (T, H, W) as three little-endian uint32 + T*H*W*3 bytes of
RGB frames; ``A`` + a uint64 count + float32 mono samples; ``C`` closes (the file is kept). End of input without
``C`` discards the file. On success the child prints one JSON line ``{"frames_written": N}``.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from aniportrait.data.video import FrameSink, VideoWriter
from aniportrait.errors import AniPortraitError

__all__ = ["EncoderProcess", "encoder_threads"]

# x264 threads of a streamed video when none are asked for: about one per core, at most this many. One thread encodes
# about 10 frames/s of a 512 x 512 random-weight video (preset medium) on an H200 host, below real time; frame threads
# scale that with the cores (each adds a frame of latency). The bitstream depends on the thread count (each count
# is deterministic): pass threads= for byte-identical files across machines.
MAX_AUTO_THREADS = 16

_FRAMES, _AUDIO, _CLOSE = b"F", b"A", b"C"


class EncoderProcess(FrameSink):
    """:class:`VideoWriter`'s interface (``write``, ``set_audio``, ``close``, ``abort``, ``frames_written``; a
    context manager that keeps the file only when the block succeeds), encoding in a child process."""

    def __init__(self, path: str | os.PathLike, fps: float, crf: int = 18, preset: str = "medium",
                 audio_sample_rate: int = 16_000, threads: int = 1, gop_size: int | None = None):
        self.path = Path(path)
        self.frames_written = 0
        self._size: tuple[int, int] | None = None
        self._audio_sent = False
        settings = {"path": str(self.path), "fps": float(fps), "crf": crf, "preset": preset,
                    "audio_sample_rate": audio_sample_rate, "threads": threads, "gop_size": gop_size}
        package_root = str(Path(__file__).resolve().parents[2])  # the child imports this package from here too
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self._stderr = tempfile.TemporaryFile()
        self._child = subprocess.Popen([sys.executable, "-m", "aniportrait.data.video_encoder", json.dumps(settings)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env)
        _widen_pipe(self._child.stdin.fileno())

    def set_audio(self, samples: np.ndarray | None) -> None:
        """Mono float32 audio at ``audio_sample_rate``, muxed when the writer closes (call before ``write``)."""
        if self._size is not None:
            raise AniPortraitError("EncoderProcess.set_audio must be called before the first frame is written")
        if samples is None:
            return
        audio = np.ascontiguousarray(np.asarray(samples, dtype=np.float32).reshape(-1))
        self._send(_AUDIO + struct.pack("<Q", len(audio)), audio.tobytes())
        self._audio_sent = True

    def write(self, frames: np.ndarray) -> None:
        frames = self._frame_batch(frames)
        count, height, width = frames.shape[:3]
        if self._size is None:
            self._size = (height, width)
        elif (height, width) != self._size:
            raise AniPortraitError(f"{self.path}: a {width}x{height} frame after {self._size[1]}x{self._size[0]} "
                                   "ones; every frame of a video has one size")
        self._send(_FRAMES + struct.pack("<III", count, height, width), memoryview(np.ascontiguousarray(frames)).cast("B"))
        self.frames_written += count

    def close(self) -> Path:
        if self._size is None:
            self.abort()
            raise AniPortraitError(f"no frames were written to {self.path}; nothing to save")
        self._send(_CLOSE, b"")
        self._child.stdin.close()
        output = self._child.stdout.read()
        if self._child.wait() != 0:
            raise self._error("could not finish")
        written = json.loads(output.decode().strip().splitlines()[-1])["frames_written"]
        if written != self.frames_written:
            raise AniPortraitError(f"{self.path}: the encoder wrote {written} of {self.frames_written} frames")
        self._stderr.close()
        return self.path

    def abort(self) -> None:
        """Stop the child without keeping the file (it removes its temporary file)."""
        try:
            self._child.stdin.close()
        except OSError:  # already gone
            pass
        try:
            self._child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()
        self._stderr.close()

    def _send(self, header: bytes, payload: bytes | memoryview) -> None:
        try:
            self._child.stdin.write(header)
            if len(payload):
                self._child.stdin.write(payload)
        except (BrokenPipeError, ValueError):  # the child stopped (its error says why)
            self._child.wait()
            raise self._error("stopped") from None

    def _error(self, what: str) -> AniPortraitError:
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        return AniPortraitError(f"the video encoder for {self.path} {what} (exit code {self._child.returncode}): "
                                f"{lines[-1] if lines else 'no message'}")


def encoder_threads(threads: int | None) -> int:
    """x264 threads: ``threads``, or (None) the usable cores up to ``MAX_AUTO_THREADS``."""
    if threads is not None:
        return int(threads)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_AUTO_THREADS, cores))


def _widen_pipe(fd: int, size: int = 1 << 20) -> None:
    """A 1 MiB pipe buffer on Linux (a 512 x 512 frame is 0.75 MiB; the default 64 KiB costs a wake-up per 64 KiB)."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (ImportError, OSError):  # not Linux, or above /proc/sys/fs/pipe-max-size: the default buffer works too
        pass


def _read(stream, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError
    return data


def _serve(settings: dict) -> int:
    """The child: frames and audio from stdin into a VideoWriter; the file is kept only after ``C``."""
    stream = sys.stdin.buffer
    writer = VideoWriter(settings["path"], settings["fps"], crf=settings["crf"], preset=settings["preset"],
                         audio_sample_rate=settings["audio_sample_rate"], threads=settings["threads"],
                         gop_size=settings["gop_size"])
    try:
        while True:
            kind = stream.read(1)
            if kind == _FRAMES:
                count, height, width = struct.unpack("<III", _read(stream, 12))
                frames = np.frombuffer(_read(stream, count * height * width * 3), np.uint8)
                writer.write(frames.reshape(count, height, width, 3))
            elif kind == _AUDIO:
                (samples,) = struct.unpack("<Q", _read(stream, 8))
                writer.set_audio(np.frombuffer(_read(stream, samples * 4), np.float32))
            elif kind == _CLOSE:
                writer.close()
                print(json.dumps({"frames_written": writer.frames_written}), flush=True)
                return 0
            else:  # end of input without close (the caller aborted or died), or a broken message
                writer.abort()
                return 2 if kind else 0
    except EOFError:
        writer.abort()
        return 2
    except BaseException:
        writer.abort()
        raise


if __name__ == "__main__":
    sys.exit(_serve(json.loads(sys.argv[1])))
