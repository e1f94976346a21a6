"""Speech-like audio (source-filter synthesis at 16 kHz) and the per-frame mouth controls it drives.

An utterance is a plan of phrases of words of syllables, separated by silent pauses. Each syllable is an
optional consonant (a short band-passed noise burst at its onset) and a vowel: a glottal pulse train
(Rosenberg pulses, pitch following a per-phrase declining intonation with accents on stressed syllables)
through three formant resonators of the vowel, shaped by the syllable envelope. The same envelope, times
the vowel's openness, is the jaw opening: see the package docstring for the exact relation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import butter, sosfilt

__all__ = [
    "Vowel",
    "VOWELS",
    "Syllable",
    "Utterance",
    "MouthControls",
    "plan_utterance",
    "synthesize_speech",
    "mouth_controls",
    "syllable_envelope",
]


@dataclass(frozen=True)
class Vowel:
    formants_hz: tuple[float, float, float]  # F1, F2, F3 of an adult male voice
    openness: float  # jaw opening at full envelope
    spread: float  # lip spreading (mouth corners outwards) at full envelope
    pucker: float  # lip rounding (corners inwards, lips forward) at full envelope
    loudness: float  # voiced amplitude at full envelope: open vowels are louder, as in real speech


VOWELS: dict[str, Vowel] = {
    "a": Vowel((730.0, 1090.0, 2440.0), openness=1.0, spread=0.2, pucker=0.0, loudness=1.0),
    "e": Vowel((530.0, 1840.0, 2480.0), openness=0.7, spread=0.5, pucker=0.0, loudness=0.85),
    "i": Vowel((270.0, 2290.0, 3010.0), openness=0.45, spread=1.0, pucker=0.0, loudness=0.725),
    "o": Vowel((570.0, 840.0, 2410.0), openness=0.8, spread=0.0, pucker=0.7, loudness=0.9),
    "u": Vowel((300.0, 870.0, 2240.0), openness=0.5, spread=0.0, pucker=1.0, loudness=0.75),
}
VOWEL_FREQUENCIES = {"a": 0.3, "e": 0.2, "i": 0.2, "o": 0.15, "u": 0.15}
FORMANT_BANDWIDTHS_HZ = (90.0, 110.0, 170.0)

# Syllable envelope: raised-cosine attack, flat top, raised-cosine decay (fractions of the syllable).
ATTACK_FRACTION = 0.3
SUSTAIN_FRACTION = 0.3
DECAY_FRACTION = 1.0 - ATTACK_FRACTION - SUSTAIN_FRACTION

VOICE_GAIN = 0.18  # waveform RMS of a full-envelope "a"
BACKGROUND_NOISE_RMS = 0.001  # about -60 dBFS of white noise under everything
LEADING_SILENCE_S = (0.15, 0.45)
TRAILING_SILENCE_S = 0.12
PHRASE_PAUSE_S = (0.25, 0.7)
RESONATOR_TAIL_S = 0.03  # formant ringing kept after a syllable's envelope ends


@dataclass(frozen=True)
class Syllable:
    start_s: float
    duration_s: float
    vowel: str
    stress: float  # envelope peak in (0, 1]
    pitch_hz: float  # f0 at the syllable's centre
    burst_s: float  # consonant burst length at the onset; 0 for a bare vowel
    burst_hz: float  # the burst's centre frequency
    burst_level: float  # the burst's RMS relative to VOICE_GAIN


@dataclass(frozen=True)
class Utterance:
    syllables: tuple[Syllable, ...]
    num_samples: int
    sample_rate: int


@dataclass(frozen=True)
class MouthControls:
    """Per video frame, each (T,): the frame means of the sample-level signals (package docstring)."""

    envelope: np.ndarray  # e: syllable envelope, 0 in pauses
    jaw_open: np.ndarray  # e x openness(vowel), in [0, 1]
    spread: np.ndarray  # e x spread(vowel)
    pucker: np.ndarray  # e x pucker(vowel)


def syllable_envelope(phase: np.ndarray) -> np.ndarray:
    """Envelope shape over a syllable, ``phase`` in [0, 1): 0 -> 1 (attack), 1 (sustain), 1 -> 0 (decay)."""
    phase = np.asarray(phase, dtype=np.float64)
    attack = 0.5 - 0.5 * np.cos(np.pi * np.clip(phase / ATTACK_FRACTION, 0.0, 1.0))
    decay_phase = np.clip((phase - ATTACK_FRACTION - SUSTAIN_FRACTION) / DECAY_FRACTION, 0.0, 1.0)
    decay = 0.5 + 0.5 * np.cos(np.pi * decay_phase)
    return np.minimum(attack, decay)


def plan_utterance(
    rng: np.random.Generator, num_samples: int, sample_rate: int, pitch_hz: float, syllables_per_second: float
) -> Utterance:
    """Phrases of 2-5 words of 1-3 syllables, with word gaps and phrase pauses, filling the clip."""
    end_s = num_samples / sample_rate - TRAILING_SILENCE_S
    syllables: list[Syllable] = []
    time_s = rng.uniform(*LEADING_SILENCE_S)
    while time_s < end_s:
        phrase_pitch = pitch_hz * rng.uniform(0.94, 1.08)
        timings: list[tuple[float, float]] = []
        for _ in range(rng.integers(2, 6)):
            for _ in range(rng.integers(1, 4)):
                duration = rng.uniform(0.75, 1.3) / syllables_per_second
                timings.append((time_s, duration))
                time_s += duration
            time_s += rng.uniform(0.03, 0.12) if rng.random() < 0.6 else 0.0
        for position, (start, duration) in enumerate(timings):
            stress = rng.uniform(0.6, 1.0)
            vowel = rng.choice(list(VOWEL_FREQUENCIES), p=list(VOWEL_FREQUENCIES.values()))
            has_burst = rng.random() < 0.75
            burst_s = rng.uniform(0.015, min(0.045, 0.3 * duration))
            burst_hz, burst_level = rng.uniform(1500.0, 6000.0), rng.uniform(0.1, 0.3)
            if start + duration > end_s:
                break
            # Declination over the phrase; stressed syllables carry a pitch accent.
            declination = 1.1 - 0.2 * position / max(len(timings) - 1, 1)
            syllables.append(Syllable(
                start_s=start, duration_s=duration, vowel=str(vowel), stress=stress,
                pitch_hz=phrase_pitch * declination * (1.0 + 0.3 * (stress - 0.6)),
                burst_s=burst_s if has_burst else 0.0, burst_hz=burst_hz, burst_level=burst_level,
            ))
        time_s += rng.uniform(*PHRASE_PAUSE_S)
    return Utterance(tuple(syllables), num_samples, sample_rate)


def _syllable_span(syllable: Syllable, utterance: Utterance) -> tuple[int, int, np.ndarray]:
    """Sample range [start, stop) of a syllable and its envelope there (stress included)."""
    rate = utterance.sample_rate
    start = int(round(syllable.start_s * rate))
    length = max(int(round(syllable.duration_s * rate)), 1)
    stop = min(start + length, utterance.num_samples)
    envelope = syllable.stress * syllable_envelope(np.arange(stop - start) / length)
    return start, stop, envelope


def _formant_filter(vowel: Vowel, formant_scale: float, sample_rate: int) -> np.ndarray:
    """Cascade of Klatt two-pole resonators, one per formant, as second-order sections (3, 6)."""
    sections = []
    for formant, bandwidth in zip(vowel.formants_hz, FORMANT_BANDWIDTHS_HZ):
        frequency = min(formant * formant_scale, 0.45 * sample_rate)
        radius = np.exp(-np.pi * bandwidth / sample_rate)
        b1, b2 = 2.0 * radius * np.cos(2.0 * np.pi * frequency / sample_rate), -(radius**2)
        sections.append((1.0 - b1 - b2, 0.0, 0.0, 1.0, -b1, -b2))  # unity gain at 0 Hz
    return np.asarray(sections)


def _glottal_source(utterance: Utterance, base_pitch_hz: float, rng: np.random.Generator) -> np.ndarray:
    """(N,) derivative of a Rosenberg glottal flow whose f0 glides through the syllables' pitch targets."""
    rate = utterance.sample_rate
    times = np.arange(utterance.num_samples) / rate
    if utterance.syllables:
        centres = [s.start_s + 0.5 * s.duration_s for s in utterance.syllables]
        f0 = np.interp(times, centres, [s.pitch_hz for s in utterance.syllables])
    else:
        f0 = np.full(utterance.num_samples, base_pitch_hz)
    f0 = f0 * (1.0 + 0.012 * np.sin(2.0 * np.pi * rng.uniform(4.5, 6.5) * times + rng.uniform(0, 2 * np.pi)))
    phase = np.cumsum(f0 / rate) % 1.0
    opening, closing = 0.4, 0.16  # fractions of the period
    flow = np.where(
        phase < opening,
        0.5 - 0.5 * np.cos(np.pi * phase / opening),
        np.where(phase < opening + closing, np.cos(0.5 * np.pi * (phase - opening) / closing), 0.0),
    )
    source = np.diff(flow, prepend=0.0)
    return source + 0.02 * source.std() * rng.standard_normal(len(source))  # a little breathiness


def synthesize_speech(
    utterance: Utterance, base_pitch_hz: float, formant_scale: float, rng: np.random.Generator
) -> np.ndarray:
    """(N,) float32 waveform: per syllable, vowel = source x envelope through the vowel's resonators,
    normalised so its RMS follows ``VOICE_GAIN x loudness x envelope``; plus consonant bursts and noise."""
    rate, count = utterance.sample_rate, utterance.num_samples
    source = _glottal_source(utterance, base_pitch_hz, rng)
    audio = np.zeros(count)
    tail = int(RESONATOR_TAIL_S * rate)
    for syllable in utterance.syllables:
        start, stop, envelope = _syllable_span(syllable, utterance)
        vowel = VOWELS[syllable.vowel]
        excitation = np.concatenate([source[start:stop] * envelope, np.zeros(tail)])
        voiced = sosfilt(_formant_filter(vowel, formant_scale, rate), excitation)
        voiced *= np.sqrt(np.sum(envelope**2) / max(np.sum(voiced**2), 1e-20))
        end = min(start + len(voiced), count)
        audio[start:end] += VOICE_GAIN * vowel.loudness * voiced[: end - start]
        if syllable.burst_s > 0.0:
            length = min(int(syllable.burst_s * rate), count - start)
            band = np.clip(syllable.burst_hz * np.array((0.7, 1.3)), 100.0, 0.49 * rate)
            noise = sosfilt(butter(2, band, btype="bandpass", fs=rate, output="sos"), rng.standard_normal(length))
            noise *= np.hanning(length) / max(noise.std(), 1e-12)
            audio[start : start + length] += VOICE_GAIN * syllable.burst_level * noise
    audio += BACKGROUND_NOISE_RMS * rng.standard_normal(count)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def _frame_means(signal: np.ndarray, num_frames: int, fps: float, sample_rate: int) -> np.ndarray:
    """(T,) mean of a per-sample signal over each video frame's samples [t/fps, (t+1)/fps)."""
    bounds = np.minimum(np.floor(np.arange(num_frames + 1) * sample_rate / fps).astype(np.int64), len(signal))
    sums = np.add.reduceat(signal, bounds[:-1])
    return sums / np.maximum(np.diff(bounds), 1)


def mouth_controls(utterance: Utterance, num_frames: int, fps: float) -> MouthControls:
    """Frame means of e(n) and of e(n) x openness / spread / pucker of the vowel being spoken."""
    count = utterance.num_samples
    signals = np.zeros((4, count))  # envelope, jaw, spread, pucker per sample
    for syllable in utterance.syllables:
        start, stop, envelope = _syllable_span(syllable, utterance)
        vowel = VOWELS[syllable.vowel]
        factors = np.array((1.0, vowel.openness, vowel.spread, vowel.pucker))[:, None]
        signals[:, start:stop] = factors * envelope
    envelope, jaw, spread, pucker = (
        _frame_means(signal, num_frames, fps, utterance.sample_rate) for signal in signals
    )
    return MouthControls(envelope=envelope, jaw_open=jaw, spread=spread, pucker=pucker)
