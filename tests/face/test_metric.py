"""The pose-free metric mesh derived from MediaPipe's public outputs equals the official lmks3d."""

import numpy as np
import pytest
from conftest import shared_path

from aniportrait.face.metric import GeometryMetadata, MetricConverter, solve_weighted_procrustes
from aniportrait.face.template import load_face_template


@pytest.fixture(scope="module")
def converter():
    task = shared_path("samples", "models", "face_landmarker_v2_with_blendshapes.task")
    return MetricConverter(GeometryMetadata.from_task_file(task))


@pytest.mark.parametrize("name", ["Aragaki", "lyl", "solo"])
def test_mesh_and_pose_match_official(converter, name):
    data = np.load(shared_path("reference", "fixtures", "drawing", "data.npz"))
    _, pose, mesh = converter.convert(data[f"{name}.lmks"], (512, 512))
    np.testing.assert_allclose(mesh, data[f"{name}.lmks3d"], atol=1e-3)
    np.testing.assert_allclose(pose, data[f"{name}.trans_mat"], atol=1e-3)
    with_reported_matrix = converter.canonical_mesh(data[f"{name}.lmks"], data[f"{name}.trans_mat"], (512, 512))
    np.testing.assert_allclose(with_reported_matrix, data[f"{name}.lmks3d"], atol=1e-3)


def test_metadata_is_the_canonical_face(converter):
    metadata = converter.metadata
    assert metadata.canonical_vertices.shape == (468, 3) and metadata.triangles.shape[1] == 3
    assert (metadata.landmark_weights > 0).sum() > 10


def test_procrustes_recovers_a_similarity():
    rng = np.random.default_rng(0)
    source = rng.normal(size=(100, 3))
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    target = 1.7 * source @ rotation.T + np.array([1.0, -2.0, 3.0])
    transform = solve_weighted_procrustes(source, target, np.ones(100))
    np.testing.assert_allclose(transform[:3, :3], 1.7 * rotation, atol=1e-9)
    np.testing.assert_allclose(transform[:3, 3], [1.0, -2.0, 3.0], atol=1e-9)


def test_template_is_a_face():
    template = load_face_template()
    assert template.mesh.shape == (468, 3) and template.triangles.shape == (852, 3)
    width, height, depth = np.ptp(template.mesh, axis=0)
    assert 12 < width < 20 and 12 < height < 20 and 5 < depth < 15  # centimetres
