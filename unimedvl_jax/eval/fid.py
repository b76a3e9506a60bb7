"""Fréchet Inception Distance (docs/evaluation.md §8.6 Image metrics): InceptionV3 pool3 features of uint8 images
(unimedvl_jax/eval/inception.py), their Gaussian statistics, the Fréchet distance between two of them, per image
folder and per modality."""

from __future__ import annotations

import functools
import os
import pathlib
import warnings
from collections.abc import Iterable, Mapping

import jax
import numpy as np
import scipy.linalg
from flax import nnx
from PIL import Image

from unimedvl_jax.eval.inception import INPUT_SIZE, InceptionV3, load_inception, preprocess

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Largest imaginary part tolerated on the diagonal of sqrtm(Σ1 Σ2) before the result is rejected (as pytorch-fid).
IMAG_TOLERANCE = 1e-3


def image_paths(folder) -> list[pathlib.Path]:
    """The image files (IMAGE_EXTENSIONS, any case) under `folder`, recursively, sorted."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory of images")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


def read_image(path) -> np.ndarray:
    """An 8-bit image file as a uint8 RGB (H, W, 3) array (grey replicated, alpha dropped, as PIL convert("RGB"))."""
    with Image.open(path) as img:
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            raise ValueError(f"{path}: {img.mode} image; FID reads 8-bit images, convert it to 8 bits first")
        return np.asarray(img.convert("RGB"), np.uint8)


def _image_source(images):
    """Images given as a folder path, or the iterable of arrays itself."""
    if isinstance(images, (str, os.PathLike)):
        return (read_image(p) for p in image_paths(images))
    return images


@functools.lru_cache(maxsize=2)
def _cached_inception(cache_dir) -> InceptionV3:
    return load_inception(cache_dir)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def inception_features(images: Iterable, *, batch_size: int = 16, model: InceptionV3 | None = None,
                       cache_dir=None) -> np.ndarray:
    """(N, 2048) float32 pool3 features of uint8 images (H, W[, 1 | 3], any size; or a folder path), run in batches
    of exactly `batch_size` (the last one zero-padded) so the network compiles once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    model = model if model is not None else _cached_inception(None if cache_dir is None else str(cache_dir))
    graphdef, state = nnx.split(model)
    buf = np.zeros((batch_size, INPUT_SIZE, INPUT_SIZE, 3), np.float32)
    out, filled = [], 0

    def flush(n):
        out.append(np.asarray(_forward(graphdef, state, buf))[:n])

    for i, image in enumerate(_image_source(images)):
        try:
            buf[filled] = preprocess(image)
        except ValueError as e:
            raise ValueError(f"image {i}: {e}") from e
        filled += 1
        if filled == batch_size:
            flush(filled)
            filled = 0
    if filled:
        buf[filled:] = 0.0
        flush(filled)
    if not out:
        raise ValueError("inception_features: no images")
    return np.concatenate(out)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) in float64 of (N, D) features, N ≥ 2."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature statistics need (N >= 2, D) features, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), the matrix square root by scipy.linalg.sqrtm as the reference
    implementations (eps·I added to both covariances if the product has no finite root; tiny imaginary parts
    dropped, large ones an error)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"Fréchet distance needs means (D,) and covariances (D, D) of one D, got {mu1.shape}, "
                         f"{sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # singular products are checked below
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            warnings.warn(f"Fréchet distance: Σ1 Σ2 has no finite square root; adding {eps}·I to both covariances",
                          stacklevel=2)
            offset = eps * np.eye(d)
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if imag > IMAG_TOLERANCE:
            raise ValueError(f"Fréchet distance: sqrtm(Σ1 Σ2) has an imaginary component {imag:.3g} "
                             f"(> {IMAG_TOLERANCE}); the covariances are not valid")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _trace_sqrt_product_low_rank(f1: np.ndarray, f2: np.ndarray) -> float:
    """tr (Σ1 Σ2)^½ from the features themselves: with centred X1 (n1, D), X2 (n2, D), Σi = Xiᵀ Xi / (ni − 1), the
    non-zero eigenvalues of Σ1 Σ2 are those of K Kᵀ / ((n1 − 1)(n2 − 1)), K = X1 X2ᵀ, so the trace of the root is the
    sum of K's singular values / √((n1 − 1)(n2 − 1)) — exact, and cheap while n1, n2 ≤ D."""
    x1, x2 = f1 - f1.mean(axis=0), f2 - f2.mean(axis=0)
    singular = np.linalg.svd(x1 @ x2.T, compute_uv=False)
    return float(singular.sum() / np.sqrt((len(f1) - 1) * (len(f2) - 1)))


def fid_from_features(features1, features2) -> float:
    """FID of two (N, D) feature sets: the exact low-rank form of the trace term while both sets have at most D
    samples, otherwise statistics + frechet_distance (scipy sqrtm)."""
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    mu1, sigma1 = feature_statistics(f1)
    mu2, sigma2 = feature_statistics(f2)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"FID: feature sets of different widths {f1.shape[1]} and {f2.shape[1]}")
    if max(len(f1), len(f2)) > f1.shape[1]:
        return frechet_distance(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_product_low_rank(f1, f2))


def fid_between_folders(generated_dir, reference_dir, *, batch_size: int = 16, model: InceptionV3 | None = None,
                        cache_dir=None) -> float:
    """FID between the images of two folders (each at least 2 images)."""
    kw = dict(batch_size=batch_size, model=model, cache_dir=cache_dir)
    return fid_from_features(inception_features(generated_dir, **kw), inception_features(reference_dir, **kw))


def fid_per_modality(sets: Mapping[str, tuple], *, batch_size: int = 16, model: InceptionV3 | None = None,
                     cache_dir=None) -> dict[str, dict]:
    """{modality: {"fid", "n_generated", "n_reference"}} for {modality: (generated, reference)}, each side a folder
    path or an iterable of uint8 images."""
    kw = dict(batch_size=batch_size, model=model, cache_dir=cache_dir)
    results = {}
    for modality, pair in sets.items():
        if len(pair) != 2:
            raise ValueError(f"FID for {modality!r}: expected (generated, reference), got {len(pair)} items")
        try:
            gen, ref = (inception_features(side, **kw) for side in pair)
            results[modality] = {"fid": fid_from_features(gen, ref), "n_generated": len(gen),
                                 "n_reference": len(ref)}
        except ValueError as e:
            raise ValueError(f"FID for {modality!r}: {e}") from e
    return results

