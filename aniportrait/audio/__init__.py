"""Audio loading, resampling, wav2vec2 input preparation and frame alignment."""

from aniportrait.audio.io import SAMPLE_RATE, frame_count, load_audio, normalize_for_wav2vec2, write_wav

__all__ = ["SAMPLE_RATE", "frame_count", "load_audio", "normalize_for_wav2vec2", "write_wav"]
