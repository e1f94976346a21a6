"""Pose images reproduce the official FaceMeshVisualizer exactly."""

import json

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image

from aniportrait.face.drawing import draw_landmarks
from aniportrait.face.topology import DRAW_GROUPS

NAMES = ("Aragaki", "lyl", "solo")


@pytest.fixture(scope="module")
def fixture_dir():
    return shared_path("reference", "fixtures", "drawing")


def _png(path):
    return np.array(Image.open(path))


def test_draw_order_and_colours_match_official(fixture_dir):
    official = json.loads((fixture_dir / "connections.json").read_text())
    ours = [(list(edge), list(colour)) for _, colour, edges in DRAW_GROUPS for edge in edges]
    assert ours == [(entry["edge"], entry["color"]) for entry in official]
    assert {entry["thickness"] for entry in official} == {2}


@pytest.mark.parametrize("name", NAMES)
def test_drawings_match_official_pixels(fixture_dir, name):
    data = np.load(fixture_dir / "data.npz")
    cases = [
        (f"{name}_normed_512.png", draw_landmarks(data[f"{name}.lmks"], (512, 512), normalized=True)),
        (f"{name}_pixel_512.png", draw_landmarks(data[f"{name}.lmks_px"], (512, 512))),
        (f"{name}_pixel_640x480.png", draw_landmarks(data[f"{name}.lmks_px_640x480"], (480, 640))),
    ]
    for file_name, image in cases:
        reference = _png(fixture_dir / file_name)
        assert image.shape == reference.shape, file_name
        assert np.array_equal(image, reference), f"{file_name}: {(image != reference).any(-1).sum()} pixels differ"


@pytest.mark.parametrize("frame", [0, 1])
def test_projected_drawings_match_official(fixture_dir, frame):
    data = np.load(fixture_dir / "data.npz")
    image = draw_landmarks(data["project.out_512x512"][frame], (512, 512))
    assert np.array_equal(image, _png(fixture_dir / f"projected_frame{frame}_512.png"))


def test_points_outside_the_image_drop_their_lines():
    landmarks = np.full((478, 2), 256.0)
    inside = draw_landmarks(landmarks + np.linspace(0, 100, 478)[:, None], (512, 512))
    outside = draw_landmarks(np.full((478, 2), -5.0), (512, 512))
    assert inside.any() and not outside.any()
