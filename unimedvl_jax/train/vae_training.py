"""Training the FLUX-architecture autoencoder (§1.3, §3.10) on the images of a record split.

The released model ships a pretrained FLUX AE and keeps it frozen; a from-scratch tiny setup has no such VAE, and a
random one turns every generated image into noise. This module trains a small AE of the same architecture on the
train split (random square crops, L1 + MSE reconstruction, a small KL term), then fits the latent normalisation
(`shift_factor` = mean, `scale_factor` = 1/std of the posterior means, as FLUX's constants were chosen) so the
flow-matching targets have unit scale. The result is a VAE checkpoint that `train.init_vae_from` installs into a
UniMedVL before its training starts; the curriculum keeps it frozen.

Layout:  <dir>/config.json   the vae config (with the fitted scale/shift) and the training report
         <dir>/params/       orbax StandardCheckpointer save of the AutoEncoder's nnx.Param state
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from unimedvl_jax.models.vae import AutoEncoder

log = logging.getLogger(__name__)

GEOMETRY_KEYS = ("resolution", "in_channels", "downsample", "ch", "out_ch", "ch_mult", "num_res_blocks",
                 "z_channels", "norm_groups", "norm_eps")


def vae_training_config(**overrides) -> ml_collections.ConfigDict:
    """The `vae_training` section: steps, batch of square crops, optimiser and loss weights."""
    c = ml_collections.ConfigDict(dict(
        steps=1500, batch_size=16, crop_size=64, lr=1e-3, warmup_steps=100, min_lr=1e-5, kl_weight=1e-6,
        mse_weight=1.0, grad_clip=1.0, seed=0, log_every=100, max_images=0,  # 0 = every image of the split
        eval_images=64, stats_crops=256,
    ))
    c.update(overrides)
    return c


# --------------------------------------------------------------------------------------------- data


def split_images(data_cfg, split: str, *, max_images: int = 0) -> list[np.ndarray]:
    """Distinct images of a split, each resized by the VAE transform (§6) to float32 HxWx3 in [-1, 1]."""
    from data_pipelines.loader import open_split
    from data_pipelines.schema import decode_image
    from data_pipelines.pipeline import source_records
    from data_pipelines.transforms import ImageTransform

    transform = ImageTransform.from_config(data_cfg.vae_transform)
    seen, images = set(), []
    for record in source_records(open_split(data_cfg, split), name=split):
        for key, blob in zip(record.meta.get("image_keys", [f"{record.id}/{j}" for j in range(len(record.images))]),
                             record.images):
            if key in seen:
                continue
            seen.add(key)
            images.append(transform(decode_image(blob, record_id=record.id)).astype(np.float32))
            if max_images and len(images) >= max_images:
                return images
    if not images:
        raise ValueError(f"split {split!r} of {data_cfg.dataset} in {data_cfg.data_dir} has no images")
    return images


class CropSampler:
    """Deterministic batches of random square crops (with horizontal flips) from a list of images."""

    def __init__(self, images: list[np.ndarray], crop: int, batch: int, seed: int):
        small = [i for i, im in enumerate(images) if min(im.shape[:2]) < crop]
        if small:
            raise ValueError(f"{len(small)} image(s) are smaller than crop_size={crop} (first: index {small[0]}, "
                             f"shape {images[small[0]].shape}); lower vae_training.crop_size")
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


def psnr(a: np.ndarray, b: np.ndarray, *, peak: float = 2.0) -> float:
    """PSNR in dB of two images whose value range spans `peak` (2 for [-1, 1], 255 for uint8)."""
    err = float(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    return float("inf") if err == 0 else 10.0 * np.log10(peak ** 2 / err)


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
    vae = AutoEncoder(vae_cfg, rngs=nnx.Rngs(int(tc.seed)))
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


# --------------------------------------------------------------------------------------------- checkpoint


def save_vae_checkpoint(path: str, vae: AutoEncoder, vae_cfg, report: dict | None = None) -> None:
    """Write config.json (vae config + report) and params/ for an AutoEncoder."""
    os.makedirs(path, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, "params"), nnx.state(vae, nnx.Param))
    checkpointer.wait_until_finished()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"vae": vae_cfg.to_dict(), "report": report or {}}, f, indent=2)


def load_vae_config(path: str) -> ml_collections.ConfigDict:
    """The vae config (with its fitted latent scale/shift) of a VAE checkpoint."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing; {path} is not a VAE checkpoint (unimedvl-train-vae)")
    with open(cfg_path) as f:
        return ml_collections.ConfigDict(json.load(f)["vae"])


def adopt_vae_config(model_cfg, path: str) -> None:
    """Set model_cfg.vae's latent scale/shift from a VAE checkpoint; its geometry must match (in place)."""
    saved = load_vae_config(path)
    diff = {k: (model_cfg.vae[k], saved[k]) for k in GEOMETRY_KEYS
            if json.dumps(model_cfg.vae[k]) != json.dumps(saved[k])}
    if diff:
        raise ValueError(f"VAE checkpoint {path} does not match model.vae: " +
                         ", ".join(f"{k}: config {a!r} vs checkpoint {b!r}" for k, (a, b) in diff.items()))
    model_cfg.vae.scale_factor, model_cfg.vae.shift_factor = saved.scale_factor, saved.shift_factor


def install_vae_weights(vae: AutoEncoder, path: str) -> None:
    """Load a VAE checkpoint's weights into an AutoEncoder (in place), keeping each parameter's sharding."""
    current = nnx.state(vae, nnx.Param)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), current)
    nnx.update(vae, ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), "params"), target))


def install_vae(model, path: str) -> None:
    """Load a VAE checkpoint into model.vae_model (in place); adopt_vae_config must have set its scale/shift."""
    saved = load_vae_config(path)
    vae = model.vae_model
    if (vae.scale_factor, vae.shift_factor) != (saved.scale_factor, saved.shift_factor):
        raise ValueError(f"model built with vae scale/shift {vae.scale_factor}/{vae.shift_factor} but {path} "
                         f"fitted {saved.scale_factor}/{saved.shift_factor}; call adopt_vae_config(cfg.model, "
                         f"path) before building the model")
    install_vae_weights(vae, path)
