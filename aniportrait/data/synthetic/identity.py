"""Synthetic identities: a face shape, colours and a voice, all drawn from one seeded generator.

An identity is a pure function of ``(seed, identity index)``. Its face shape is the project's face
template (``aniportrait.face.template``) under an anisotropic scale, a jaw-width change, a nose-length
change and a few mirrored Gaussian bumps, so every identity keeps MediaPipe's topology and a plausible,
left-right symmetric face. The inner lips of the neutral face are brought together ("sealed") so that a
face with its jaw at rest has its mouth closed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aniportrait.face.template import load_face_template
from aniportrait.face.topology import INNER_LIP_POLYGON, LEFT_EYE_POLYGON, RIGHT_EYE_POLYGON

__all__ = ["Identity", "make_identity", "LIP_SEAL_GAP_CM"]

IDENTITY_STREAM = 1  # the random stream of identities; clips use others (see dataset.py)

# Base colours (RGB); each identity jitters one skin tone, one hair colour and one iris colour.
SKIN_TONES = ((238, 200, 178), (226, 176, 146), (205, 145, 110), (176, 118, 84), (134, 88, 62), (96, 62, 45))
HAIR_COLOURS = ((28, 24, 22), (62, 42, 30), (110, 74, 46), (205, 170, 110), (150, 72, 40), (160, 158, 155))
IRIS_COLOURS = ((92, 56, 30), (60, 40, 25), (70, 110, 150), (80, 120, 80), (120, 100, 60))
LIP_TINT = np.array((180.0, 70.0, 80.0))

LIP_SEAL_GAP_CM = 0.03  # inner-lip gap of every neutral face: closed, but the mouth polygon stays valid
IRIS_RADIUS_CM = 0.58  # human iris diameter is about 11.7 mm

# Inner-lip contour split into its lower and upper halves, paired left to right (corners excluded).
_LOWER_INNER_LIP = INNER_LIP_POLYGON[1:10]  # 95 .. 324
_UPPER_INNER_LIP = INNER_LIP_POLYGON[11:][::-1]  # 191 .. 415, the same left-to-right order


@dataclass(frozen=True)
class Identity:
    """Everything fixed about one synthetic person."""

    index: int
    neutral_mesh: np.ndarray  # (468, 3) float64 cm, canonical space, lips sealed
    iris_points: np.ndarray  # (10, 3) canonical: right iris centre + ring, left iris centre + ring
    skin: np.ndarray  # (3,) RGB 0..255
    lips: np.ndarray  # (3,)
    brows: np.ndarray  # (3,)
    hair: np.ndarray  # (3,)
    hair_volume_cm: float  # how far the hair stands off the skull
    hair_length_cm: float  # how far below the ears the hair reaches at the back and sides
    iris: np.ndarray  # (3,)
    clothing: np.ndarray  # (3,)
    background_top: np.ndarray  # (3,) colour of the top row; the background is a vertical gradient
    background_bottom: np.ndarray  # (3,)
    pitch_hz: float  # base voice pitch
    formant_scale: float  # vocal-tract length factor (shorter tracts, higher formants)
    syllables_per_second: float  # speaking rate


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _shape(rng: np.random.Generator, template: np.ndarray) -> np.ndarray:
    """(468, 3) identity face shape: scale, jaw width, nose length and mirrored bumps of the template."""
    mesh = template * rng.uniform((0.9, 0.92, 0.9), (1.1, 1.08, 1.1))
    x, y = mesh[:, 0], mesh[:, 1]
    # Jaw width: x scaled progressively from the nose base down to the chin.
    lower_face = _smoothstep((-1.0 - y) / (-1.0 - y.min()))
    mesh[:, 0] = x * (1.0 + rng.uniform(-0.12, 0.12) * lower_face)
    # Nose length: the nose tip region moves forward (and slightly down) by up to half a centimetre.
    nose_tip = mesh[4]
    nose_weight = np.exp(-np.sum((mesh[:, :2] - nose_tip[:2]) ** 2, axis=1) / (2 * 1.3**2))
    nose_shift = rng.uniform(-0.35, 0.5)
    mesh[:, 2] += nose_shift * nose_weight
    mesh[:, 1] -= 0.3 * nose_shift * nose_weight
    # Mirrored Gaussian bumps keep the face symmetric; centres are mesh vertices on the +x side.
    for _ in range(4):
        centre = mesh[rng.choice(np.flatnonzero(mesh[:, 0] >= 0))]
        push = rng.normal(0.0, 0.25, size=3)
        radius = rng.uniform(2.0, 4.0)
        for sign in (1.0, -1.0):
            mirrored_centre = centre * (sign, 1.0, 1.0)
            weight = np.exp(-np.sum((mesh - mirrored_centre) ** 2, axis=1) / (2 * radius**2))
            mesh += weight[:, None] * (push * (sign, 1.0, 1.0))
    return mesh


def _seal_lips(mesh: np.ndarray) -> np.ndarray:
    """Bring each upper/lower inner-lip pair to their midpoint, leaving ``LIP_SEAL_GAP_CM`` between them."""
    mesh = mesh.copy()
    lower, upper = list(_LOWER_INNER_LIP), list(_UPPER_INNER_LIP)
    midpoint = 0.5 * (mesh[lower] + mesh[upper])  # (9, 3)
    half_gap = np.array((0.0, 0.5 * LIP_SEAL_GAP_CM, 0.0))
    mesh[lower] = midpoint - half_gap
    mesh[upper] = midpoint + half_gap
    return mesh


def _iris_points(mesh: np.ndarray, eye_polygons: tuple[tuple[int, ...], tuple[int, ...]]) -> np.ndarray:
    """(10, 3) MediaPipe's iris points, fixed to the skull: per eye the centre, then +x, +y, -x, -y."""
    ring = IRIS_RADIUS_CM * np.array(((0, 0, 0), (1, 0, 0), (0, 1, 0), (-1, 0, 0), (0, -1, 0)), dtype=np.float64)
    return np.concatenate([mesh[list(polygon)].mean(axis=0) + ring for polygon in eye_polygons])


def _jitter(rng: np.random.Generator, base: tuple[int, int, int], spread: float) -> np.ndarray:
    return np.clip(np.asarray(base, dtype=np.float64) + rng.normal(0.0, spread, size=3), 0.0, 255.0)


def _random_colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> np.ndarray:
    """An RGB colour from a uniform hue and the given saturation / value ranges (HSV)."""
    hue = rng.uniform(0.0, 6.0)
    sat, val = rng.uniform(*saturation), rng.uniform(*value) * 255.0
    ramp = np.clip(np.abs((hue + np.array((0.0, 4.0, 2.0))) % 6.0 - 3.0) - 1.0, 0.0, 1.0)
    return val * (1.0 - sat + sat * ramp)


def make_identity(seed: int, index: int) -> Identity:
    """The identity ``index`` of the dataset seeded ``seed`` (pure and deterministic)."""
    rng = np.random.default_rng([seed, index, IDENTITY_STREAM])
    mesh = _seal_lips(_shape(rng, load_face_template().mesh.astype(np.float64)))
    skin = _jitter(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 6.0)
    hair = _jitter(rng, HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], 8.0)
    pitch_hz = float(rng.uniform(90.0, 230.0))
    return Identity(
        index=index,
        neutral_mesh=mesh,
        iris_points=_iris_points(mesh, (RIGHT_EYE_POLYGON, LEFT_EYE_POLYGON)),
        skin=skin,
        lips=0.55 * skin + 0.45 * LIP_TINT * rng.uniform(0.8, 1.1),
        brows=0.6 * hair + 0.4 * skin * 0.45,
        hair=hair,
        hair_volume_cm=float(rng.uniform(0.4, 2.2)),
        hair_length_cm=float(rng.uniform(-1.0, 13.0)),
        iris=_jitter(rng, IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))], 10.0),
        clothing=_random_colour(rng, (0.2, 0.7), (0.25, 0.8)),
        background_top=_random_colour(rng, (0.1, 0.5), (0.45, 0.95)),
        background_bottom=_random_colour(rng, (0.1, 0.5), (0.3, 0.8)),
        pitch_hz=pitch_hz,
        # Higher voices come with shorter vocal tracts: formants up to ~18 % higher.
        formant_scale=float(1.0 + 0.18 * (pitch_hz - 90.0) / 140.0 + rng.uniform(-0.03, 0.03)),
        syllables_per_second=float(rng.uniform(3.6, 5.4)),
    )
