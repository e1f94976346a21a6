"""Load any common audio (wav, flac, mp3, m4a/aac, or the audio track of a video) as 16 kHz mono float32.

Decoding goes through PyAV (FFmpeg), so every container and sample format FFmpeg reads works; channels
are averaged to mono and the rate is changed with a polyphase filter (``scipy.signal.resample_poly``).
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from aniportrait.errors import AniPortraitError

__all__ = ["SAMPLE_RATE", "load_audio", "check_finite", "normalize_for_wav2vec2", "frame_count", "write_wav", "samples_per_frame"]

SAMPLE_RATE = 16_000


def _decode(path: Path) -> tuple[np.ndarray, int]:
    """All audio samples of the first audio stream as float32 (N, channels) at the native rate."""
    import av

    try:
        with av.open(str(path)) as container:
            streams = [s for s in container.streams if s.type == "audio"]
            if not streams:
                raise AniPortraitError(f"{path} has no audio stream; give a speech file (wav, flac, mp3, m4a)")
            stream = streams[0]
            chunks = []
            rate = stream.codec_context.sample_rate or stream.rate
            for frame in container.decode(stream):
                data = frame.to_ndarray()
                if frame.format.is_planar:
                    data = data.T  # (samples, channels)
                else:
                    data = data.reshape(-1, len(frame.layout.channels))
                if np.issubdtype(data.dtype, np.unsignedinteger):  # e.g. 8-bit PCM: offset binary
                    half = float(np.iinfo(data.dtype).max + 1) / 2
                    data = (data.astype(np.float32) - half) / half
                elif np.issubdtype(data.dtype, np.integer):
                    data = data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
                chunks.append(data.astype(np.float32, copy=False))
                rate = frame.sample_rate or rate
    except AniPortraitError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError, IndexError) as error:
        raise AniPortraitError(f"cannot decode audio file {path} ({error}); check that it is a valid audio file") from error
    if not chunks:
        return np.zeros((0, 1), dtype=np.float32), int(rate or SAMPLE_RATE)
    return np.concatenate(chunks, axis=0), int(rate)


def check_finite(samples: np.ndarray, name: str, sample_rate: int = SAMPLE_RATE) -> None:
    """Float recordings can carry NaN or infinite samples, which would turn every feature into NaN: refuse them."""
    bad = ~np.isfinite(samples)
    if bad.any():
        first = int(np.flatnonzero(bad.any(axis=1) if bad.ndim == 2 else bad)[0])
        raise AniPortraitError(f"{name} holds {int(bad.sum())} NaN or infinite samples (the first at "
                               f"{first / sample_rate:.3f} s); re-export it as PCM (e.g. 16-bit wav)")


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples in [-1, 1] at ``sample_rate``. Silence is valid; an empty file is an error."""
    from scipy.signal import resample_poly

    path = Path(path)
    if not path.is_file():
        raise AniPortraitError(f"audio file not found: {path}; check the path (config key audio=...)")
    if path.stat().st_size == 0:
        raise AniPortraitError(f"audio file {path} is empty (0 bytes); give a non-empty speech recording")
    samples, native_rate = _decode(path)
    if samples.shape[0] == 0:
        raise AniPortraitError(f"audio file {path} has no samples (zero duration); give a non-empty speech recording")
    check_finite(samples, f"audio file {path}", native_rate)
    mono = samples.mean(axis=1, dtype=np.float64)
    if native_rate != sample_rate:
        ratio = Fraction(sample_rate, native_rate)
        mono = resample_poly(mono, ratio.numerator, ratio.denominator)
    return np.clip(mono, -1.0, 1.0).astype(np.float32)


def normalize_for_wav2vec2(samples: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the whole signal: ``Wav2Vec2FeatureExtractor(do_normalize=True)``."""
    samples = np.asarray(samples, dtype=np.float32)
    return (samples - samples.mean()) / np.sqrt(samples.var() + 1e-7)


def frame_count(num_samples: int, fps: float, sample_rate: int = SAMPLE_RATE) -> int:
    """Video frames covering the audio: ``ceil(duration * fps)``, computed exactly for rational fps."""
    fps_fraction = Fraction(fps).limit_denominator(1001)
    return math.ceil(Fraction(num_samples, sample_rate) * fps_fraction)


def samples_per_frame(fps: float, sample_rate: int = SAMPLE_RATE) -> float:
    return sample_rate / float(fps)


def write_wav(path: str | os.PathLike, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """16-bit PCM mono wav (the clip format's audio.wav)."""
    import soundfile

    pcm = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    soundfile.write(str(path), pcm, sample_rate, subtype="PCM_16", format="WAV")
