"""CSIM's face alignment and similarity, and the video landmark metrics (LMD, blendshape error)."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aniportrait.metrics.identity import (
    ARCFACE_TEMPLATE,
    IdentitySimilarity,
    align_faces,
    five_points,
    random_arcface,
)
from aniportrait.metrics.landmarks import (
    MOUTH_POINTS,
    blendshape_error_per_frame,
    landmark_distance_per_frame,
)


def test_alignment_maps_the_five_points_onto_the_arcface_template():
    angle, scale, shift = np.deg2rad(20), 2.5, np.array([40.0, 25.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = ARCFACE_TEMPLATE @ (scale * rotation).T + shift  # the template seen through a similarity transform
    image = np.zeros((360, 360, 3), np.uint8)
    for x, y in points:
        cv2.circle(image, (round(x), round(y)), 4, (255, 255, 255), -1)
    aligned = align_faces(image[None], points[None])[0]
    for x, y in ARCFACE_TEMPLATE:
        assert aligned[round(y), round(x)].min() > 200  # every dot lands on its template position


def test_five_points_are_iris_centres_nose_tip_and_mouth_corners():
    landmarks = np.arange(478 * 2, dtype=np.float32).reshape(478, 2)
    np.testing.assert_array_equal(five_points(landmarks), landmarks[[468, 473, 1, 61, 291]])


def test_identity_similarity_is_the_mean_cosine_to_the_source():
    network = random_arcface(seed=0)
    faces = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    metric = IdentitySimilarity(network, batch_size=2)
    source = metric.embeddings(faces[:1])[0]
    with torch.no_grad():
        raw = network(torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    expected = F.cosine_similarity(raw, raw[:1], dim=1)
    torch.testing.assert_close(metric(faces, source), expected, rtol=1e-5, atol=1e-6)
    assert metric(faces[:1], source).item() == pytest.approx(1.0, abs=1e-6)


def test_landmark_distance_and_blendshape_error_per_frame():
    rng = np.random.default_rng(1)
    target = rng.uniform(0, 64, (4, 478, 3))
    pred = target.copy()
    pred[:, :, 0] += 3.0  # 3 px to the right everywhere
    pred[1, list(MOUTH_POINTS), 1] += 4.0  # frame 1: the mouth also 4 px down: 5 px off
    np.testing.assert_allclose(landmark_distance_per_frame(pred, target), [3.0, 3 + 40 / 468 * 2, 3.0, 3.0])
    np.testing.assert_allclose(landmark_distance_per_frame(pred, target, MOUTH_POINTS), [3.0, 5.0, 3.0, 3.0])
    scores = rng.uniform(0, 1, (2, 52))
    other = scores.copy()
    other[:, 0] += 0.5  # the neutral score does not count
    other[1, 1:] += 0.1
    np.testing.assert_allclose(blendshape_error_per_frame(other, scores), [0.0, 0.1])
