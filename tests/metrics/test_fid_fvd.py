"""FID and FVD pipelines on random-init networks of the real architectures (no pretrained weights needed)."""

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from aniportrait.metrics.fid import FrechetInceptionDistance, random_inception
from aniportrait.metrics.fvd import FrechetVideoDistance, clip_starts, load_i3d, preprocess_clips, random_i3d
from aniportrait.metrics.weights import MetricUnavailable, resolve_weights


@pytest.fixture(scope="module")
def inception():
    return random_inception(seed=0)


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory):
    """A random I3D-shaped network saved as TorchScript, loaded like StyleGAN-V's i3d_torchscript.pt."""
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(random_i3d(width=0.25, seed=0)), str(path))
    return path


def frames(seed: int, count: int = 6, size: int = 48) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, size, size, 3), generator=generator, dtype=torch.uint8)


def test_fid_is_zero_for_identical_sets_and_positive_for_different_ones(inception):
    fid = FrechetInceptionDistance(inception, batch_size=4)
    fid.update("reference", frames(0))
    fid.update("same", frames(0))
    fid.update("other", frames(1))
    assert fid.compute("same") == pytest.approx(0.0, abs=1e-6)
    assert fid.compute("other") > 1.0


def test_fid_equals_torchmetrics_with_the_same_network(inception):
    from torchmetrics.image.fid import FrechetInceptionDistance as TorchmetricsFID

    reference, generated = frames(2), frames(3)
    ours = FrechetInceptionDistance(inception, batch_size=4)
    ours.update("reference", reference)
    ours.update("generated", generated)
    theirs = TorchmetricsFID(feature=inception)
    theirs.update(reference.permute(0, 3, 1, 2), real=True)
    theirs.update(generated.permute(0, 3, 1, 2), real=False)
    assert ours.compute("generated") == pytest.approx(float(theirs.compute()), rel=1e-4)


def test_random_inception_is_the_torch_fidelity_architecture_and_seeded(inception):
    from torchmetrics.image.fid import NoTrainInceptionV3

    assert isinstance(inception, NoTrainInceptionV3) and inception.features_list == ["2048"]
    assert not inception.use_antialias  # TF1 bilinear resize, as torch-fidelity's FID
    again = random_inception(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(inception.state_dict().values(), again.state_dict().values()))


def test_preprocessing_resizes_the_short_side_centre_crops_and_scales_to_minus_one_one():
    generator = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (2, 3, 32, 48, 3), generator=generator, dtype=torch.uint8)  # (n, T, H, W, 3)
    out = preprocess_clips(clips)
    assert out.shape == (2, 3, 3, 224, 224)
    assert out.min() >= -1.0 and out.max() <= 1.0
    resized = F.interpolate(clips[0].permute(0, 3, 1, 2).float(), size=(224, 336), mode="bilinear", align_corners=False)
    expected = resized[:, :, :, 56:280] / 127.5 - 1.0  # (T, 3, 224, 224)
    torch.testing.assert_close(out[0].permute(1, 0, 2, 3), expected)


def test_fvd_through_a_torchscript_file_is_zero_for_identical_sets_and_positive_for_different(i3d_file):
    fvd = FrechetVideoDistance(load_i3d(i3d_file), batch_size=2)
    clips = torch.stack([frames(seed, count=16, size=32) for seed in range(3)])  # (3, 16, 32, 32, 3)
    fvd.update("reference", clips)
    fvd.update("same", clips.clone())
    fvd.update("other", torch.stack([frames(seed, count=16, size=32) for seed in range(10, 13)]))
    assert fvd.compute("same") == pytest.approx(0.0, abs=1e-6)
    assert fvd.compute("other") > 0.0


def test_fvd_matches_stylegan_v_formula_with_biased_covariances(i3d_file):
    fvd = FrechetVideoDistance(load_i3d(i3d_file), batch_size=2)
    real = torch.stack([frames(seed, count=16, size=32) for seed in range(4)])
    fake = torch.stack([frames(seed, count=16, size=32) for seed in range(20, 24)])
    real_features = fvd.update("reference", real).numpy()
    fake_features = fvd.update("generated", fake).numpy()

    def mean_cov(x):  # StyleGAN-V FeatureStats.get_mean_cov
        mean = x.sum(axis=0) / len(x)
        return mean, (x.T @ x) / len(x) - np.outer(mean, mean)

    mu_real, sigma_real = mean_cov(real_features)
    mu_gen, sigma_gen = mean_cov(fake_features)
    root, _ = scipy.linalg.sqrtm(np.dot(sigma_gen, sigma_real), disp=False)
    expected = float(np.real(np.square(mu_gen - mu_real).sum() + np.trace(sigma_gen + sigma_real - root * 2)))
    assert fvd.compute("generated") == pytest.approx(expected, rel=1e-5)


def test_the_detector_gets_the_stylegan_v_call():
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, x, rescale: bool = True, resize: bool = True, return_features: bool = False):
            seen.update(shape=tuple(x.shape), low=float(x.min()), high=float(x.max()), rescale=rescale, resize=resize,
                        return_features=return_features)
            return x.mean(dim=(2, 3, 4))

    FrechetVideoDistance(Recorder()).features(torch.full((1, 16, 40, 40, 3), 255, dtype=torch.uint8))
    assert seen == {"shape": (1, 3, 16, 224, 224), "low": pytest.approx(1.0), "high": pytest.approx(1.0),
                    "rescale": False, "resize": False, "return_features": True}


def test_clip_sampling_is_seeded_per_clip_and_stays_inside_the_video():
    first = clip_starts(64, "clip_a", clip_frames=16, clips_per_video=4, seed=0)
    assert first == clip_starts(64, "clip_a", clip_frames=16, clips_per_video=4, seed=0)
    assert first != clip_starts(64, "clip_a", clip_frames=16, clips_per_video=4, seed=1)
    assert first != clip_starts(64, "clip_b", clip_frames=16, clips_per_video=4, seed=0)
    assert len(set(first)) == 4 and min(first) >= 0 and max(first) <= 64 - 16
    assert max(clip_starts(64, "c", clip_frames=16, clips_per_video=3, frame_stride=2)) <= 64 - 31
    assert clip_starts(15, "short", clip_frames=16) == []
    assert clip_starts(16, "exact", clip_frames=16, clips_per_video=5) == [0]


def test_missing_weights_offline_are_unavailable_with_the_config_key(tmp_path, monkeypatch):
    monkeypatch.setenv("ANIPORTRAIT_CACHE", str(tmp_path))
    with pytest.raises(MetricUnavailable, match=r"metrics\.i3d=PATH"):
        resolve_weights("i3d", None, download=False)
    with pytest.raises(MetricUnavailable, match="does not exist"):
        resolve_weights("inception", tmp_path / "nope.pth")
    with pytest.raises(MetricUnavailable, match="no public download"):
        resolve_weights("arcface", None)
