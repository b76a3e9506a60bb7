"""PSNR and Gaussian SSIM against scikit-image on the same settings (σ 1.5, 11×11 window, population covariance)."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from unimedvl_jax.image_metrics import gaussian_window, psnr, ssim


def _skimage_ssim(a, b, data_range):
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=data_range, channel_axis=-1 if a.ndim == 3 else None)


def _structured(h, w, c=None):
    """A smooth scene (gradient + disc + stripes) in [0, 1], optionally with colour channels."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = 0.4 * x + 0.3 * ((x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.08) + 0.2 * (np.sin(40 * y) > 0)
    if c is not None:
        img = np.stack([np.roll(img, 3 * i, axis=1) for i in range(c)], -1)
    return img


@pytest.mark.parametrize("shape", [(32, 40), (29, 33, 3)])
def test_ssim_matches_skimage_on_random_images(shape):
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 255, shape)
    b = np.clip(a + rng.normal(0, 30, shape), 0, 255)
    ours, ref = ssim(a, b, data_range=255.0), _skimage_ssim(a, b, 255.0)
    assert abs(ours - ref) < 1e-6, (ours, ref)
    assert 0.0 < ours < 1.0


@pytest.mark.parametrize("shape", [(64, 48), (40, 56, 3)])
def test_ssim_matches_skimage_on_structured_images(shape):
    a = _structured(*shape)
    rng = np.random.default_rng(1)
    for b in (np.roll(a, 2, axis=0), 0.8 * a + 0.1, a + rng.normal(0, 0.05, a.shape)):
        for lo, hi in ((0.0, 1.0), (-1.0, 1.0)):  # [0, 1] images and the model's [-1, 1] range
            aa, bb = lo + (hi - lo) * a, lo + (hi - lo) * b
            ours, ref = ssim(aa, bb, data_range=hi - lo), _skimage_ssim(aa, bb, hi - lo)
            assert abs(ours - ref) < 1e-6, (shape, lo, ours, ref)


def test_ssim_of_identical_images_is_one_and_uint8_accepted():
    a = (255 * _structured(24, 24, 3)).astype(np.uint8)
    assert ssim(a, a, data_range=255) == pytest.approx(1.0, abs=1e-12)
    b = np.clip(a.astype(int) + 20, 0, 255).astype(np.uint8)
    assert abs(ssim(a, b, data_range=255) - _skimage_ssim(a.astype(np.float64), b.astype(np.float64), 255)) < 1e-6


def test_ssim_rejects_bad_inputs():
    a = np.zeros((16, 16))
    with pytest.raises(ValueError, match="one shape"):
        ssim(a, np.zeros((16, 17)), data_range=1.0)
    with pytest.raises(ValueError, match="larger than the image"):
        ssim(a[:8], a[:8], data_range=1.0)
    with pytest.raises(ValueError, match="data_range"):
        ssim(a, a, data_range=0.0)
    with pytest.raises(ValueError, match="odd"):
        gaussian_window(10, 1.5)


def test_gaussian_window_is_the_scipy_kernel():
    # scipy.ndimage.gaussian_filter(sigma=1.5, truncate=3.5) uses radius int(3.5 * 1.5 + 0.5) = 5: 11 taps.
    impulse = np.zeros(11)
    impulse[5] = 1.0
    np.testing.assert_allclose(gaussian_window(11, 1.5), gaussian_filter1d(impulse, 1.5, truncate=3.5), atol=1e-15)


@pytest.mark.parametrize("peak", [255.0, 2.0])
def test_psnr_matches_skimage(peak):
    rng = np.random.default_rng(2)
    a = rng.uniform(0, peak, (20, 30, 3))
    b = np.clip(a + rng.normal(0, 0.05 * peak, a.shape), 0, peak)
    assert psnr(a, b, peak=peak) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=peak), abs=1e-9)
    assert psnr(a, a, peak=peak) == float("inf")
