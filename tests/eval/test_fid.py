"""FID: the Fréchet distance against a direct eigen-decomposition formula, its low-rank feature form against scipy's
sqrtm, the numerical guards, and the whole image → InceptionV3 → FID path (self ≈ 0, growing with a shift,
folders, per modality)."""

import numpy as np
import pytest
from PIL import Image

from unimedvl_jax.eval import fid, inception


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The FID InceptionV3, converted into a temporary cache (never ~/.cache) once for this module."""
    return inception.load_inception(tmp_path_factory.mktemp("inception_cache"))


BATCH = 3  # one batch shape for the whole module: the network compiles once (plus once for batch_size=5 below)


def _psd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d


def _direct_fid(mu1, s1, mu2, s2):
    """‖Δμ‖² + tr Σ1 + tr Σ2 − 2 Σ √λ(Σ1^½ Σ2 Σ1^½), the root of Σ1 from its eigen-decomposition."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(lam)))


@pytest.mark.parametrize("d", [1, 3, 8])
def test_frechet_distance_matches_direct_formula(d):
    rng = np.random.default_rng(d)
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), _psd(rng, d), _psd(rng, d)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_direct_fid(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    # one-dimensional Gaussians: (μ1 − μ2)² + (σ1 − σ2)²
    if d == 1:
        expected = (mu1[0] - mu2[0]) ** 2 + (np.sqrt(s1[0, 0]) - np.sqrt(s2[0, 0])) ** 2
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n1,n2,d", [(10, 7, 24), (12, 12, 24), (40, 30, 16)])
def test_low_rank_form_equals_sqrtm(n1, n2, d):
    """fid_from_features' exact low-rank trace (n ≤ D) and its statistics path (n > D) agree with scipy's sqrtm."""
    rng = np.random.default_rng(n1 + d)
    f1, f2 = rng.normal(size=(n1, d)), 0.5 + 1.5 * rng.normal(size=(n2, d))
    mu1, s1 = fid.feature_statistics(f1)
    mu2, s2 = fid.feature_statistics(f2)
    assert fid.fid_from_features(f1, f2) == pytest.approx(fid.frechet_distance(mu1, s1, mu2, s2), rel=1e-6)
    assert fid.fid_from_features(f1, f2) == pytest.approx(_direct_fid(mu1, s1, mu2, s2), rel=1e-6)


def test_feature_statistics():
    f = np.random.default_rng(0).normal(size=(5, 3))
    mu, sigma = fid.feature_statistics(f)
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(sigma, (f - mu).T @ (f - mu) / 4)  # unbiased, as the reference implementations
    with pytest.raises(ValueError, match="N >= 2"):
        fid.feature_statistics(f[:1])


def test_eps_offset_when_the_product_has_no_square_root():
    """[[0, 1], [0, 0]] has no square root (sqrtm gives inf): the eps·I offset of the reference implementations."""
    eps = 1e-6
    s1, s2, mu = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2), np.zeros(2)
    with pytest.warns(UserWarning, match="no finite square root"):
        value = fid.frechet_distance(mu, s1, mu, s2, eps=eps)
    # (Σ1 + εI)(Σ2 + εI) = (1 + ε)[[ε, 1], [0, ε]]: a double eigenvalue ε(1 + ε), so tr √ = 2 √(ε(1 + ε)).
    assert value == pytest.approx(2.0 - 4 * np.sqrt(eps * (1 + eps)), rel=1e-9)


def test_large_imaginary_part_is_an_error():
    with pytest.raises(ValueError, match="imaginary component"):
        fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="one D"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def _scene(k, size=96):
    """A synthetic RGB image: a few coloured discs over a sinusoidal background."""
    r = np.random.default_rng(k)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.full((size, size, 3), 40.0) + 30 * np.sin(r.uniform(5, 20) * x)[..., None]
    for _ in range(4):
        cy, cx, rad = r.uniform(0.2, 0.8), r.uniform(0.2, 0.8), r.uniform(0.08, 0.3)
        img += r.uniform(40, 120, 3) * ((x - cx) ** 2 + (y - cy) ** 2 < rad ** 2)[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def scenes():
    return [_scene(k) for k in range(6)]


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift(model, scenes):
    base = fid.inception_features(scenes, batch_size=BATCH, model=model)
    assert base.shape == (6, 2048) and base.dtype == np.float32
    # Identical sets have identical statistics: the mean term is 0 and tr (Σ Σ)^½ = tr Σ, computed as the sum of the
    # singular values of a PSD Gram matrix (= its trace up to rounding), so only float64 rounding remains.
    assert abs(fid.fid_from_features(base, base)) < 1e-6 * np.trace(fid.feature_statistics(base)[1])
    values = []
    for shift in (10, 30, 60):
        shifted = [np.clip(s.astype(np.int16) + shift, 0, 255).astype(np.uint8) for s in scenes]
        values.append(fid.fid_from_features(base, fid.inception_features(shifted, batch_size=BATCH, model=model)))
    assert 0 < values[0] < values[1] < values[2], values


def test_features_do_not_depend_on_the_batch_split(model, scenes):
    a = fid.inception_features(scenes[:5], batch_size=BATCH, model=model)  # a full batch + a zero-padded one
    b = fid.inception_features(iter(scenes[:5]), batch_size=5, model=model)
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="no images"):
        fid.inception_features([], batch_size=BATCH, model=model)
    with pytest.raises(ValueError, match="image 1: .*uint8"):
        fid.inception_features([scenes[0], scenes[1].astype(np.float32)], batch_size=BATCH, model=model)


def _write(folder, images):
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    return folder


def test_folders_and_per_modality(model, scenes, tmp_path):
    gen, grey = scenes[:3], [s[..., 0] for s in scenes[3:5]]  # grey PNGs are read as RGB, the channel replicated
    _write(tmp_path / "gen", gen)
    _write(tmp_path / "ref" / "nested", grey)
    (tmp_path / "ref" / "notes.txt").write_text("not an image")
    from_folders = fid.fid_between_folders(tmp_path / "gen", tmp_path / "ref", batch_size=BATCH, model=model)
    result = fid.fid_per_modality({"CT": (tmp_path / "gen", tmp_path / "ref"), "MRI": (gen, grey)},
                                  batch_size=BATCH, model=model)
    assert set(result) == {"CT", "MRI"}
    assert (result["CT"]["n_generated"], result["CT"]["n_reference"]) == (3, 2)
    # PNG is lossless: the folders and the in-memory arrays give the same FID
    assert result["CT"]["fid"] == pytest.approx(from_folders, rel=1e-9)
    assert result["MRI"]["fid"] == pytest.approx(from_folders, rel=1e-6)
    assert from_folders > 0


def test_folder_errors_name_the_folder_or_file(model, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no images"):
        fid.image_paths(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing: not a directory"):
        fid.image_paths(tmp_path / "missing")
    deep = tmp_path / "deep"
    deep.mkdir()
    Image.fromarray(np.full((8, 8), 4000, np.uint16)).save(deep / "scan.png")
    with pytest.raises(ValueError, match="scan.png: I;16 image"):
        fid.read_image(deep / "scan.png")
    with pytest.raises(ValueError, match="'CT': .*N >= 2"):
        fid.fid_per_modality({"CT": ([np.zeros((8, 8), np.uint8)], [np.zeros((8, 8), np.uint8)] * 2)},
                             batch_size=BATCH, model=model)
