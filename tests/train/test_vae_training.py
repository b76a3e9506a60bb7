"""Training the tiny FLUX-architecture VAE on unimed-mini (train/vae_training.py): the loss falls, the latent
normalisation is fitted, and the checkpoint installs into a UniMedVL exactly (weights + scale/shift)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from data_pipelines.loader import split_images
from unimedvl_jax.models.unimedvl import UniMedVL
from unimedvl_jax.models.vae import AutoEncoder
from unimedvl_jax.testing import small_model_config
from unimedvl_jax.train import vae_checkpoint, vae_config
from unimedvl_jax.train import vae_training as vt


@pytest.fixture(autouse=True)
def _no_eager_sharding():
    with nnx.use_eager_sharding(False):
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory, unimed_mini_dir):
    """An 80-step run of an 8-channel VAE on 32² crops of 64 unimed-mini images."""
    base = tmp_path_factory.mktemp("vae")
    cfg = tiny.get_config()
    cfg.data.data_dir = str(unimed_mini_dir)
    cfg.model.vae.update(ch=8, num_res_blocks=1, norm_groups=4)
    cfg.vae_training = vae_config.vae_training_config(steps=80, batch_size=8, crop_size=32, lr=2e-3, warmup_steps=5,
                                              log_every=20, max_images=64, eval_images=8, stats_crops=32)
    lines = []
    report = vt.train_vae(cfg, str(base / "vae"), console=lines.append)
    return {"cfg": cfg, "dir": base / "vae", "report": report, "lines": lines}


def test_reconstruction_improves_and_progress_is_printed(trained):
    report = trained["report"]
    assert [h["step"] for h in report["history"]] == [20, 40, 60, 80]
    # fixed training crops: a random AE reproduces them at ~7 dB, 80 steps reach ~13 dB
    assert report["psnr_db"]["train"] > report["psnr_db_at_init"]["train"] + 4.0
    assert np.isfinite(report["psnr_db"]["val"])
    assert sum(line.startswith("vae step") for line in trained["lines"]) == 4
    assert any("reconstruction PSNR" in line for line in trained["lines"])


def test_fitted_normalisation_whitens_the_latents(trained):
    """encode(sample=False) of the saved VAE has mean ≈ 0 and std ≈ 1 over fresh training crops."""
    cfg, path = trained["cfg"], str(trained["dir"])
    saved = vae_checkpoint.load_vae_config(path)
    assert saved.scale_factor == pytest.approx(trained["report"]["scale_factor"])
    vae = AutoEncoder(saved, rngs=nnx.Rngs(1))
    vae_checkpoint.install_vae_weights(vae, path)
    images = split_images(cfg.data, "train", max_images=64)
    crops = np.stack([next(vt.CropSampler(images, 32, 1, seed=s))[0] for s in range(48)])
    z = np.asarray(vae.encode(jnp.asarray(crops), sample=False))
    assert abs(z.mean()) < 0.25 and 0.75 < z.std() < 1.25


def test_install_into_unimedvl(trained):
    cfg, path = trained["cfg"], str(trained["dir"])
    model_cfg = small_model_config()
    model_cfg.vae = cfg.model.vae
    vae_checkpoint.adopt_vae_config(model_cfg, path)
    model = UniMedVL(model_cfg, rngs=nnx.Rngs(0))
    vae_checkpoint.install_vae(model, path)
    standalone = AutoEncoder(vae_checkpoint.load_vae_config(path), rngs=nnx.Rngs(2))
    vae_checkpoint.install_vae_weights(standalone, path)
    x = jax.random.uniform(jax.random.key(0), (1, 32, 32, 3), minval=-1, maxval=1)
    np.testing.assert_array_equal(np.asarray(model.vae_model.encode(x, sample=False)),
                                  np.asarray(standalone.encode(x, sample=False)))


def test_geometry_mismatch_and_missing_checkpoint_are_clear_errors(trained, tmp_path):
    model_cfg = small_model_config()
    model_cfg.vae = trained["cfg"].model.vae.copy_and_resolve_references()
    model_cfg.vae.z_channels = 8
    with pytest.raises(ValueError, match="z_channels: config 8 vs checkpoint 4"):
        vae_checkpoint.adopt_vae_config(model_cfg, str(trained["dir"]))
    with pytest.raises(FileNotFoundError, match="not a VAE checkpoint"):
        vae_checkpoint.load_vae_config(str(tmp_path))
    with pytest.raises(FileExistsError, match="already holds a VAE checkpoint"):
        vt.train_vae(trained["cfg"], str(trained["dir"]))
    report = json.loads((trained["dir"] / "config.json").read_text())["report"]
    assert report["train_images"] == 64


def test_crop_sampler_pads_images_shorter_than_the_crop():
    tall = np.linspace(-1, 1, 128 * 32 * 3, dtype=np.float32).reshape(128, 32, 3)    # a 1:4 whole-body scan
    padded = vt.pad_to(tall, 64)
    assert padded.shape == (128, 64, 3)
    np.testing.assert_array_equal(padded[:, 16:48], tall)
    np.testing.assert_array_equal(padded[:, :16], np.repeat(tall[:, :1], 16, axis=1))    # edge values
    crops = next(vt.CropSampler([tall], 64, 8, seed=0))
    assert crops.shape == (8, 64, 64, 3) and np.isfinite(crops).all()
