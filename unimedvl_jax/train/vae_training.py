"""Training the FLUX-architecture autoencoder (docs/model.md §1.3, docs/model.md §3.10) on the images of a record split.

The released model ships a pretrained FLUX AE and keeps it frozen; a from-scratch tiny setup has no such VAE, and a
random one turns every generated image into noise. This module trains a small AE of the same architecture on the
train split (random square crops, L1 + MSE reconstruction, a small KL term), then fits the latent normalisation
(`shift_factor` = mean, `scale_factor` = 1/std of the posterior means, as FLUX's constants were chosen) so the
flow-matching targets have unit scale. The result is a VAE checkpoint that `train.init_vae_from` installs into a
UniMedVL before its training starts; the curriculum keeps it frozen.

The config section is train/vae_config.py, the checkpoint layout and its installation train/vae_checkpoint.py.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from data_pipelines.loader import split_images
from unimedvl_jax.image_metrics import psnr
from unimedvl_jax.models.vae import AutoEncoder
from unimedvl_jax.train.vae_checkpoint import save_vae_checkpoint

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- crops


class CropSampler:
    """Deterministic batches of random square crops (with horizontal flips) from a list of images; an image with a
    side shorter than the crop (e.g. a 1:4 whole-body scan) is edge-padded to it, with a warning."""

    def __init__(self, images: list[np.ndarray], crop: int, batch: int, seed: int):
        small = [i for i, im in enumerate(images) if min(im.shape[:2]) < crop]
        if small:
            log.warning("%d image(s) have a side shorter than crop_size=%d (first: index %d, shape %s): edge-padded "
                        "to it", len(small), crop, small[0], images[small[0]].shape)
            short = set(small)
            images = [pad_to(im, crop) if i in short else im for i, im in enumerate(images)]
        self.images, self.crop, self.batch = images, crop, batch
        self.rng = np.random.default_rng(seed)

    def __next__(self) -> np.ndarray:
        out = np.empty((self.batch, self.crop, self.crop, 3), np.float32)
        for b in range(self.batch):
            im = self.images[int(self.rng.integers(len(self.images)))]
            y = int(self.rng.integers(im.shape[0] - self.crop + 1))
            x = int(self.rng.integers(im.shape[1] - self.crop + 1))
            patch = im[y:y + self.crop, x:x + self.crop]
            out[b] = patch[:, ::-1] if self.rng.random() < 0.5 else patch
        return out


def pad_to(image: np.ndarray, size: int) -> np.ndarray:
    """`image` (H, W, C) edge-padded symmetrically so that both sides are at least `size`."""
    ph, pw = max(0, size - image.shape[0]), max(0, size - image.shape[1])
    return np.pad(image, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="edge")


# --------------------------------------------------------------------------------------------- training


def vae_loss(vae: AutoEncoder, x, key, *, kl_weight: float, mse_weight: float):
    """L1 + mse_weight·MSE reconstruction of a posterior sample, plus kl_weight·KL(q(z|x) ‖ N(0, I)) per element."""
    mean, logvar = vae.encode_moments(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    recon = vae.decoder(z)
    l1 = jnp.mean(jnp.abs(recon - x))
    mse = jnp.mean(jnp.square(recon - x))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return l1 + mse_weight * mse + kl_weight * kl, {"l1": l1, "mse": mse, "kl": kl}


def center_crops(images: list[np.ndarray], size: int, factor: int) -> dict[int, np.ndarray]:
    """Centre crops grouped by side: min(size, the image's short side rounded down to `factor`) -> (N, s, s, 3)."""
    groups: dict[int, list[np.ndarray]] = {}
    for im in images:
        side = min(size, min(im.shape[:2]) // factor * factor)
        y, x = (im.shape[0] - side) // 2, (im.shape[1] - side) // 2
        groups.setdefault(side, []).append(im[y:y + side, x:x + side])
    return {side: np.stack(crops) for side, crops in groups.items()}


def _batched(fn, crops: np.ndarray, batch: int) -> np.ndarray:
    """fn over a crop array in fixed-size batches (the last one padded), so it compiles once."""
    out = []
    for i in range(0, len(crops), batch):
        chunk = crops[i:i + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        out.append(np.asarray(fn(jnp.asarray(padded)))[:len(chunk)])
    return np.concatenate(out)


@nnx.jit
def _posterior_mean(vae: AutoEncoder, x):
    return vae.encode_moments(x)[0]


@nnx.jit
def _reconstruction(vae: AutoEncoder, x):
    return jnp.clip(vae.decoder(vae.encode_moments(x)[0]), -1.0, 1.0)


def reconstruct(vae: AutoEncoder, images: np.ndarray, *, batch: int = 16) -> np.ndarray:
    """Posterior-mean reconstructions, clipped to [-1, 1], of a (N, H, W, 3) array."""
    return _batched(lambda x: _reconstruction(vae, x), images, batch)


def mean_psnr_db(vae: AutoEncoder, crops: dict[int, np.ndarray]) -> float:
    """Mean reconstruction PSNR over groups of equal-size crops (center_crops' output)."""
    return float(np.average([psnr(reconstruct(vae, c), c) for c in crops.values()],
                            weights=[len(c) for c in crops.values()]))


def latent_normalisation(vae: AutoEncoder, images: np.ndarray, *, batch: int = 16) -> tuple[float, float]:
    """(shift_factor, scale_factor) = (mean, 1/std) of the posterior means of a (N, H, W, 3) array."""
    flat = _batched(lambda x: _posterior_mean(vae, x), images, batch).astype(np.float64).reshape(-1)
    std = float(flat.std())
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"degenerate VAE latents (std {std}); training diverged?")
    return float(flat.mean()), 1.0 / std


def train_vae(cfg, out_dir: str, *, console=print) -> dict:
    """Train cfg.model.vae on cfg.data's train split per cfg.vae_training; write a VAE checkpoint to out_dir."""
    tc, vae_cfg = cfg.vae_training, cfg.model.vae
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(os.path.join(out_dir, "config.json")):
        raise FileExistsError(f"{out_dir} already holds a VAE checkpoint; choose another --out")
    images = split_images(cfg.data, cfg.data.train_split, max_images=int(tc.max_images))
    held_out = split_images(cfg.data, "val", max_images=int(tc.eval_images))
    console(f"VAE training: {len(images)} train images, {len(held_out)} val images, {tc.steps} steps of "
            f"{tc.batch_size}×{tc.crop_size}² crops")
    with nnx.use_eager_sharding(False):  # single-device training: independent of the caller's sharding mode
        vae = AutoEncoder(vae_cfg, images_per_call=int(tc.get("images_per_call", 0)) or int(tc.batch_size),
                          rngs=nnx.Rngs(int(tc.seed)))
    schedule = optax.warmup_cosine_decay_schedule(0.0, float(tc.lr), min(int(tc.warmup_steps), int(tc.steps) // 2),
                                                  int(tc.steps), float(tc.min_lr))
    tx = optax.chain(optax.clip_by_global_norm(float(tc.grad_clip)), optax.adam(schedule))
    graphdef, params = nnx.split(vae, nnx.Param)
    params = jax.tree.map(jnp.asarray, params.to_pure_dict())
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, key):
        def loss_fn(p):
            return vae_loss(nnx.merge(graphdef, p), x, key, kl_weight=float(tc.kl_weight),
                            mse_weight=float(tc.mse_weight))

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, terms

    val = center_crops(held_out, int(tc.crop_size), int(vae_cfg.downsample))
    # a fixed set of training crops (own seed) for the latent statistics and the train-set PSNR
    fixed = next(CropSampler(images, int(tc.crop_size), int(tc.stats_crops), int(tc.seed) + 1))
    initial = {"train": mean_psnr_db(nnx.merge(graphdef, params), {0: fixed}),
               "val": mean_psnr_db(nnx.merge(graphdef, params), val)}
    sampler = CropSampler(images, int(tc.crop_size), int(tc.batch_size), int(tc.seed))
    key, start, history = jax.random.key(int(tc.seed)), time.time(), []
    for i in range(1, int(tc.steps) + 1):
        key, sub = jax.random.split(key)
        params, opt_state, loss, terms = step(params, opt_state, jnp.asarray(next(sampler)), sub)
        if i % int(tc.log_every) == 0 or i == int(tc.steps):
            row = {"step": i, "loss": float(loss), **{k: float(v) for k, v in terms.items()},
                   "seconds": round(time.time() - start, 1)}
            history.append(row)
            console(f"vae step {i}/{tc.steps} loss {row['loss']:.4f} l1 {row['l1']:.4f} mse {row['mse']:.5f} "
                    f"kl {row['kl']:.3f} ({row['seconds']} s)")
            if not np.isfinite(row["loss"]):
                raise FloatingPointError(f"VAE training diverged at step {i}: {row}")
    vae = nnx.merge(graphdef, params)
    shift, scale = latent_normalisation(vae, fixed)
    final = {"train": mean_psnr_db(vae, {0: fixed}), "val": mean_psnr_db(vae, val)}
    fitted = ml_collections.ConfigDict(vae_cfg.to_dict())
    fitted.shift_factor, fitted.scale_factor = shift, scale
    report = {"train_images": len(images), "steps": int(tc.steps), "seconds": round(time.time() - start, 1),
              "psnr_db": final, "psnr_db_at_init": initial, "val_crops": {side: len(v) for side, v in val.items()},
              "shift_factor": shift, "scale_factor": scale, "history": history}
    save_vae_checkpoint(out_dir, vae, fitted, report)
    console(f"VAE: reconstruction PSNR train crops {initial['train']:.2f} -> {final['train']:.2f} dB, val centre "
            f"crops {initial['val']:.2f} -> {final['val']:.2f} dB (side: count {report['val_crops']}), "
            f"latent shift {shift:.4f} scale {scale:.4f}; saved {out_dir}")
    return report


