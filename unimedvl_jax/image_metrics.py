"""Image-quality metrics shared by VAE training, the demo and evaluation: PSNR and Gaussian-window SSIM
(docs/evaluation.md §8.6 Image metrics), numpy float64."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def psnr(a: np.ndarray, b: np.ndarray, *, peak: float = 2.0) -> float:
    """PSNR in dB of two images whose value range spans `peak` (2 for [-1, 1], 255 for uint8)."""
    err = float(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    return float("inf") if err == 0 else 10.0 * np.log10(peak ** 2 / err)


def gaussian_window(win_size: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian of `win_size` taps (odd) and standard deviation `sigma`, float64."""
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"SSIM window size must be odd and positive, got {win_size}")
    if sigma <= 0:
        raise ValueError(f"SSIM Gaussian sigma must be positive, got {sigma}")
    x = np.arange(win_size, dtype=np.float64) - (win_size - 1) / 2
    w = np.exp(-0.5 * np.square(x / sigma))
    return w / w.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable correlation of (H, W, C) with the 1-D window `w` on both spatial axes, valid region only."""
    k = w.shape[0]
    x = np.tensordot(sliding_window_view(x, k, axis=0), w, axes=([-1], [0]))
    return np.tensordot(sliding_window_view(x, k, axis=1), w, axes=([-1], [0]))


def ssim(a: np.ndarray, b: np.ndarray, *, data_range: float, gaussian_sigma: float = 1.5, win_size: int = 11,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM (Wang et al. 2004, Gaussian window) of (H, W) or (H, W, C) images whose value range spans
    `data_range` (255 for uint8, 1 for [0, 1], 2 for [-1, 1]); colour images average over channels."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs images of one shape, got {a.shape} and {b.shape}")
    if a.ndim not in (2, 3):
        raise ValueError(f"SSIM needs (H, W) or (H, W, C) images, got shape {a.shape}")
    if not data_range > 0:
        raise ValueError(f"SSIM data_range must be positive, got {data_range}")
    if min(a.shape[:2]) < win_size:
        raise ValueError(f"SSIM window {win_size} is larger than the image ({a.shape[0]}x{a.shape[1]})")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    w = gaussian_window(win_size, gaussian_sigma)
    # Local statistics over each full window (the interior of the image, as the common implementations average
    # over after cropping the window's half-width): biased (population) variances and covariance.
    mu_a, mu_b = _filter_valid(a, w), _filter_valid(b, w)
    var_a = _filter_valid(a * a, w) - mu_a * mu_a
    var_b = _filter_valid(b * b, w) - mu_b * mu_b
    cov = _filter_valid(a * b, w) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
    return float(np.mean(s))
