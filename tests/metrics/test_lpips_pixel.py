"""LPIPS against the lpips package itself, SSIM / PSNR against an independent numpy implementation."""

import lpips
import numpy as np
import pytest
import torch
import torchvision
from scipy.ndimage import correlate1d

from aniportrait.metrics.lpips_metric import LPIPS, build_lpips
from aniportrait.metrics.pixel import PSNR_CAP_DB, psnr_per_frame, ssim_per_frame


def frames(seed: int, count: int = 3, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def noisy(images: np.ndarray, seed: int, amplitude: int = 25) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(-amplitude, amplitude + 1, images.shape)
    return np.clip(images.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def package_lpips_with(net: str, backbone: torch.nn.Module) -> torch.nn.Module:
    """lpips.LPIPS whose trunk is ``backbone.features``, copied layer by layer into the package's slices."""
    reference = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
    for index in range(1, reference.net.N_slices + 1):
        for name, layer in getattr(reference.net, f"slice{index}").named_children():
            layer.load_state_dict(backbone.features[int(name)].state_dict())
    return reference


@pytest.mark.parametrize("net,builder", [("alex", torchvision.models.alexnet), ("vgg", torchvision.models.vgg16)])
def test_lpips_equals_the_package_with_the_same_random_backbone(net, builder):
    torch.manual_seed(0)
    backbone = builder(weights=None).eval()
    ours = LPIPS(build_lpips(net, backbone.state_dict()), batch_size=2)
    reference = package_lpips_with(net, backbone)
    generated, target = frames(1), noisy(frames(1), seed=2)
    expected = torch.stack([reference(lpips.im2tensor(a), lpips.im2tensor(b)).reshape(()) for a, b in zip(generated, target)])
    actual = ours(torch.from_numpy(generated), torch.from_numpy(target))
    torch.testing.assert_close(actual, expected.detach().float(), rtol=1e-5, atol=1e-6)
    assert actual.shape == (3,) and (actual > 0).all()
    assert ours(torch.from_numpy(generated), torch.from_numpy(generated)).abs().max() < 1e-6


def test_lpips_rejects_a_backbone_of_another_architecture():
    with pytest.raises(KeyError):
        build_lpips("alex", torchvision.models.vgg16(weights=None).state_dict())


def numpy_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM (Wang et al. 2004), 11-tap Gaussian window, sigma 1.5, images mirror-padded by 5 pixels (no border
    crop, as torchmetrics >= 1.x), mean over pixels and channels."""
    x, y = x.astype(np.float64) / 255.0, y.astype(np.float64) / 255.0
    taps = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    taps /= taps.sum()

    def blur(image):
        for axis in (0, 1):
            image = correlate1d(image, taps, axis=axis, mode="mirror")
        return image

    c1, c2 = 0.01**2, 0.03**2
    scores = []
    for channel in range(3):
        a, b = x[..., channel], y[..., channel]
        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b = np.maximum(blur(a * a) - mu_a**2, 0), np.maximum(blur(b * b) - mu_b**2, 0)
        covariance = blur(a * b) - mu_a * mu_b
        ssim_map = ((2 * mu_a * mu_b + c1) * (2 * covariance + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        scores.append(ssim_map.mean())
    return float(np.mean(scores))


def numpy_psnr(x: np.ndarray, y: np.ndarray) -> float:
    mse = np.mean((x.astype(np.float64) / 255.0 - y.astype(np.float64) / 255.0) ** 2)
    return float(10 * np.log10(1.0 / mse))


def test_ssim_and_psnr_match_numpy_per_frame():
    generated, target = frames(3, count=4), noisy(frames(3, count=4), seed=4)
    generated[1] = target[1] // 2  # a very different frame
    ssim = ssim_per_frame(torch.from_numpy(generated), torch.from_numpy(target), batch_size=3)
    psnr = psnr_per_frame(torch.from_numpy(generated), torch.from_numpy(target), batch_size=3)
    np.testing.assert_allclose(ssim.numpy(), [numpy_ssim(a, b) for a, b in zip(generated, target)], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(psnr.numpy(), [numpy_psnr(a, b) for a, b in zip(generated, target)], rtol=1e-5)


def test_identical_frames_score_ssim_one_and_the_psnr_cap():
    images = torch.from_numpy(frames(5, count=2))
    assert ssim_per_frame(images, images).numpy() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert psnr_per_frame(images, images).tolist() == [PSNR_CAP_DB, PSNR_CAP_DB]


def test_frames_of_different_shapes_are_an_error():
    with pytest.raises(ValueError, match="shape"):
        ssim_per_frame(torch.from_numpy(frames(0, size=64)), torch.from_numpy(frames(0, size=32)))
