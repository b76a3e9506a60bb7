"""Image-quality metrics shared by VAE training, the demo and evaluation."""

from __future__ import annotations

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray, *, peak: float = 2.0) -> float:
    """PSNR in dB of two images whose value range spans `peak` (2 for [-1, 1], 255 for uint8)."""
    err = float(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    return float("inf") if err == 0 else 10.0 * np.log10(peak ** 2 / err)
