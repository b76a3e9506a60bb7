"""Modules bridging the ViT, the VAE latents and the LLM (§3.6–3.10): fixed 2-D sin-cos tables, the timestep
embedder, latent patchify/unpatchify and flattened 2-D position ids."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimedvl_jax.models.layers import Linear, annotated_param, table_init


class PositionTable(nnx.Variable):
    """A fixed (non-trainable) table that is still saved in checkpoints (§2.1 'frozen pos tables')."""


def sincos_2d_table(side: int, dim: int) -> np.ndarray:
    """(side², dim) table, row r*side+c = [sin(c·ω), cos(c·ω), sin(r·ω), cos(r·ω)], ω in float64 (§3.7)."""
    if dim % 4:
        raise ValueError(f"sin-cos table width {dim} must be divisible by 4")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64), indexing="ij")
    col_angles = cols.reshape(-1)[:, None] * omega[None, :]
    row_angles = rows.reshape(-1)[:, None] * omega[None, :]
    table = np.concatenate([np.sin(col_angles), np.cos(col_angles), np.sin(row_angles), np.cos(row_angles)], 1)
    return table.astype(np.float32)


class PositionEmbedding(nnx.Module):
    """Frozen 2-D sin-cos table `pos_embed` (side², hidden), indexed by flattened position ids."""

    def __init__(self, side, hidden, *, param_dtype=jnp.float32):
        table = sincos_2d_table(side, hidden)
        self.pos_embed = annotated_param(None, table_init(table), table.shape, ("pos_table", "embed"), param_dtype,
                                         param_type=PositionTable)

    def __call__(self, position_ids, dtype):
        return jnp.take(self.pos_embed[...], position_ids, axis=0).astype(dtype)


def flattened_position_ids(h: int, w: int, side: int, interpolate: bool = False) -> np.ndarray:
    """Flattened 2-D ids of an h×w grid in a side×side table: 'extrapolate' r*side+c, or bucketized (§3.6)."""
    if not interpolate:
        if h > side or w > side:
            raise ValueError(f"grid {h}x{w} exceeds the {side}x{side} position table")
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        return (r * side + c).reshape(-1)
    boundaries = np.arange(1 / side, 1.0, 1 / side)
    r = np.searchsorted(boundaries, np.arange(0, 1 - 1e-6, 1 / h), side="right")
    c = np.searchsorted(boundaries, np.arange(0, 1 - 1e-6, 1 / w), side="right")
    return (r[:, None] * side + c[None, :]).reshape(-1)


def timestep_features(t, dim: int = 256):
    """DiT frequency features of raw t ∈ [0, 1] (not ×1000), cosine first (§3.9)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nnx.Module):
    """temb = fc_out(silu(fc_in(features(t)))) (official names mlp.0 / mlp.2)."""

    def __init__(self, hidden, *, frequency_dim=256, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.frequency_dim = frequency_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc_in = Linear(frequency_dim, hidden, axes=("time_freq", "embed"), **kw)
        self.fc_out = Linear(hidden, hidden, axes=("embed_in", "embed"), **kw)

    def __call__(self, t):
        return self.fc_out(jax.nn.silu(self.fc_in(timestep_features(t, self.frequency_dim))))


def patchify_latent_tokens(latents, image, row, col, patch: int):
    """Gather latent tokens (V, p·p·C) in (py, px, c) order from latents (N, Hl, Wl, C) (§3.10)."""
    offsets = jnp.arange(patch)
    rows = patch * row[:, None] + offsets[None, :]
    cols = patch * col[:, None] + offsets[None, :]
    tokens = latents[image[:, None, None], rows[:, :, None], cols[:, None, :], :]  # (V, p, p, C)
    return tokens.reshape(tokens.shape[0], patch * patch * latents.shape[-1])  # explicit: V may be 0


def unpatchify_latent(tokens, h: int, w: int, patch: int, channels: int):
    """Inverse of patchify for one h×w token grid in raster order: (h·w, p·p·C) -> (p·h, p·w, C)."""
    x = tokens.reshape(h, w, patch, patch, channels)
    return x.transpose(0, 2, 1, 3, 4).reshape(h * patch, w * patch, channels)


def patchify(x, patch: int):
    """(p·h, p·w, C) -> (h·w, p·p·C) in raster order, features (row-in-patch, col-in-patch, channel).

    The ordering shared by the ViT patches (§3.5) and the latent tokens (§3.10); works on numpy and jax arrays.
    """
    hp, wp, c = x.shape
    h, w = hp // patch, wp // patch
    x = x.reshape(h, patch, w, patch, c).transpose(0, 2, 1, 3, 4)
    return x.reshape(h * w, patch * patch * c)


def patchify_latent(latent, patch: int):
    """Patchify one latent cropped to whole patches (the inverse of unpatchify_latent)."""
    hp, wp, _ = latent.shape
    return patchify(latent[: hp - hp % patch, : wp - wp % patch], patch)


def shift_timestep(t, shift: float):
    """t ← s·t / (1 + (s−1)·t) (§3.11 step 3, §5.3)."""
    return shift * t / (1.0 + (shift - 1.0) * t)
