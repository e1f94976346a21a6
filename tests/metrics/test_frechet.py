"""The Fréchet distance and the streaming feature statistics against float64 scipy / numpy computations."""

import numpy as np
import pytest
import scipy.linalg
import torch

from aniportrait.metrics.frechet import FeatureSets, FeatureStatistics, frechet_distance


def scipy_frechet(mean1, cov1, mean2, cov2) -> float:
    """pytorch-fid / StyleGAN-V: |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), float64."""
    root, _ = scipy.linalg.sqrtm(cov1 @ cov2, disp=False)
    return float(np.real(np.square(mean1 - mean2).sum() + np.trace(cov1 + cov2 - 2 * root)))


def features(rng, n, d, shift=0.0, scale=1.0):
    mixing = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ mixing * scale + shift


@pytest.mark.parametrize("n,d", [(500, 16), (300, 64)])
def test_frechet_distance_matches_scipy_sqrtm_in_float64(n, d):
    rng = np.random.default_rng(0)
    first, second = features(rng, n, d), features(rng, n, d, shift=0.3, scale=1.5)
    stats = [(x.mean(axis=0), np.cov(x, rowvar=False)) for x in (first, second)]
    expected = scipy_frechet(*stats[0], *stats[1])
    assert frechet_distance(*stats[0], *stats[1]) == pytest.approx(expected, rel=1e-9)


def test_singular_covariances_fewer_samples_than_dimensions_stay_real_and_match():
    rng = np.random.default_rng(1)
    first, second = features(rng, 40, 128), features(rng, 40, 128, shift=0.1)
    stats = [(x.mean(axis=0), np.cov(x, rowvar=False)) for x in (first, second)]
    assert frechet_distance(*stats[0], *stats[1]) == pytest.approx(scipy_frechet(*stats[0], *stats[1]), rel=1e-6)


def test_matches_torchmetrics_fid_formula():
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(2)
    first, second = features(rng, 200, 32), features(rng, 200, 32, shift=-0.2, scale=0.7)
    stats = [(x.mean(axis=0), np.cov(x, rowvar=False)) for x in (first, second)]
    expected = float(_compute_fid(*(torch.from_numpy(v) for v in (*stats[0], *stats[1]))))
    assert frechet_distance(*stats[0], *stats[1]) == pytest.approx(expected, rel=1e-8)


def test_identical_statistics_give_zero_and_a_shift_gives_its_squared_length():
    rng = np.random.default_rng(3)
    x = features(rng, 100, 24)
    mean, cov = x.mean(axis=0), np.cov(x, rowvar=False)
    assert frechet_distance(mean, cov, mean, cov) == pytest.approx(0.0, abs=1e-9)
    shift = rng.standard_normal(24)
    assert frechet_distance(mean + shift, cov, mean, cov) == pytest.approx(np.square(shift).sum(), rel=1e-9)


@pytest.mark.parametrize("unbiased", [True, False])
def test_streaming_statistics_equal_numpy_on_all_features(unbiased):
    rng = np.random.default_rng(4)
    x = features(rng, 97, 10, shift=5.0)
    stats = FeatureStatistics(unbiased=unbiased)
    for chunk in np.array_split(x, 7):
        stats.update(torch.from_numpy(chunk).float())  # float32 features, float64 sums
    x32 = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(stats.mean, x32.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance, np.cov(x32, rowvar=False, ddof=1 if unbiased else 0), rtol=1e-9, atol=1e-12)
    assert stats.count == 97


def test_feature_sets_need_two_vectors_and_mismatched_dimensions_are_errors():
    sets = FeatureSets()
    sets.update("reference", np.zeros((1, 4)))
    with pytest.raises(ValueError, match="2 or more"):
        sets.distance("reference", "reference")
    with pytest.raises(ValueError, match="dimensions"):
        sets.update("reference", np.zeros((3, 5)))
