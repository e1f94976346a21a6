"""MediaPipe camera, projection, poses and smoothing against the official code's outputs."""

import numpy as np
import pytest
from conftest import shared_path

from aniportrait.face.geometry import (
    compose_pose6,
    matrix_to_pose6,
    pose6_to_matrix,
    project_points,
    relative_pose6,
    smooth_pose_sequence,
)


@pytest.fixture(scope="module")
def drawing_data():
    return np.load(shared_path("reference", "fixtures", "drawing", "data.npz"))


@pytest.mark.parametrize("size_key,image_size", [("out_512x512", (512, 512)), ("out_480x640", (480, 640))])
def test_projection_reproduces_official(drawing_data, size_key, image_size):
    d = drawing_data
    out = project_points(d["project.points_3d"], d["project.trans_mat"], d["project.pose_vectors"], image_size)
    np.testing.assert_allclose(out, d[f"project.{size_key}"], rtol=0, atol=1e-9)


@pytest.mark.parametrize("case,window", [("pose_temp_40_w7", 7), ("random_25_w7", 7), ("random_25_w5_default", 5),
                                         ("random_25_w4", 4)])
def test_smoothing_reproduces_official(drawing_data, case, window):
    source = drawing_data["smooth.pose_temp_40"] if case.startswith("pose_temp") else drawing_data["smooth.random_25"]
    np.testing.assert_allclose(smooth_pose_sequence(source, window), drawing_data[f"smooth.{case}"], atol=1e-12)


def test_pose6_matrix_round_trip():
    rng = np.random.default_rng(0)
    poses = np.concatenate([rng.uniform(-60, 60, (50, 3)), rng.normal(0, 5, (50, 3))], axis=1)
    np.testing.assert_allclose(matrix_to_pose6(pose6_to_matrix(poses)), poses, atol=1e-9)


def test_relative_pose_composes_back():
    rng = np.random.default_rng(1)
    reference = pose6_to_matrix(np.r_[rng.uniform(-20, 20, 3), 0.5, -1.0, -40.0])
    poses = np.concatenate([rng.uniform(-20, 20, (10, 3)), rng.normal(0, 1, (10, 3))], axis=1)
    mats = compose_pose6(reference, poses)
    np.testing.assert_allclose(relative_pose6(mats, reference), poses, atol=1e-9)
    np.testing.assert_allclose(relative_pose6(mats[:1], mats[0]), np.zeros((1, 6)), atol=1e-9)


def test_pose_rotation_is_extrinsic_xyz():
    # A 90 degree yaw (y) then nothing else maps +x to -z, as scipy's extrinsic 'xyz' does.
    mat = pose6_to_matrix(np.array([0.0, 90.0, 0.0, 0, 0, 0]))
    np.testing.assert_allclose(mat[:3, :3] @ [1, 0, 0], [0, 0, -1], atol=1e-12)
