"""Audio loading: formats, rates, channels, sample types, frame alignment and bad files."""

import math

import numpy as np
import pytest
import soundfile
from conftest import shared_path

from aniportrait.audio.io import frame_count, load_audio, normalize_for_wav2vec2
from aniportrait.errors import AniPortraitError


def _tone(rate: int, seconds: float, frequency: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    mono = 0.5 * np.sin(2 * np.pi * frequency * t)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


def _dominant_frequency(samples: np.ndarray, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize("rate,channels,subtype", [(44100, 2, "PCM_16"), (48000, 1, "PCM_24"), (22050, 2, "FLOAT"),
                                                   (8000, 1, "PCM_U8"), (16000, 1, "PCM_32")])
def test_wav_any_rate_channels_and_sample_type(tmp_path, rate, channels, subtype):
    path = tmp_path / "tone.wav"
    soundfile.write(path, _tone(rate, 1.0, channels=channels), rate, subtype=subtype)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 16000) <= 1
    assert abs(_dominant_frequency(audio) - 440) < 3
    assert 0.3 < np.abs(audio).max() <= 0.51


def test_flac_and_compressed_formats(tmp_path):
    import av

    soundfile.write(tmp_path / "tone.flac", _tone(32000, 1.0), 32000)
    assert abs(_dominant_frequency(load_audio(tmp_path / "tone.flac")) - 440) < 3
    # m4a (AAC) written with PyAV
    path = tmp_path / "tone.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=44100)
        stream.layout = "stereo"
        samples = _tone(44100, 1.0, channels=2).T.astype(np.float32)
        for start in range(0, samples.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start:start + 1024]), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = 44100, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    audio = load_audio(path)
    assert abs(len(audio) / 16000 - 1.0) < 0.1 and abs(_dominant_frequency(audio) - 440) < 5


def test_real_mp3_and_stereo_wav():
    mp3 = load_audio(shared_path("samples", "audio", "vexpress_short_case_10.mp3"))
    wav = load_audio(shared_path("samples", "audio", "aniportrait_lyl.wav"))  # 44.1 kHz stereo
    assert 4.3 < len(mp3) / 16000 < 4.5
    assert abs(len(wav) / 16000 - 7.744) < 0.01


def test_frame_count_is_ceil_of_duration_times_fps():
    assert frame_count(16000, 30) == 30
    assert frame_count(16001, 30) == 31
    assert frame_count(1, 25) == 1
    assert frame_count(123905, 30) == math.ceil(123905 / 16000 * 30)
    assert frame_count(16016, 29.97) == 30


def test_wav2vec2_normalisation_matches_feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor

    samples = np.random.default_rng(0).normal(0.1, 0.3, 8000).astype(np.float32)
    expected = Wav2Vec2FeatureExtractor(do_normalize=True)(samples, sampling_rate=16000).input_values[0]
    np.testing.assert_allclose(normalize_for_wav2vec2(samples), expected, atol=1e-5)


def test_silence_is_valid(tmp_path):
    soundfile.write(tmp_path / "silence.wav", np.zeros(8000), 16000)
    audio = load_audio(tmp_path / "silence.wav")
    assert len(audio) == 8000 and not audio.any()
    assert np.isfinite(normalize_for_wav2vec2(audio)).all()


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "not found"),
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_bytes(b"RIFF\x00\x00\x00\x00garbage" * 10), "cannot decode"),
    (lambda p: soundfile.write(p, np.zeros(0), 16000), "no samples"),
])
def test_bad_audio_names_the_file(tmp_path, make, message):
    path = tmp_path / "speech.wav"
    make(path)
    with pytest.raises(AniPortraitError, match=message) as error:
        load_audio(path)
    assert str(path) in str(error.value)
