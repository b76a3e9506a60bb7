"""Modules bridging the ViT, the VAE latents and the LLM (docs/model.md §3.6–3.10): fixed 2-D sin-cos tables, the
timestep embedder and the gather of latent tokens (the grid helpers they share with data and inference are in
patches.py)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimedvl_jax.models.layers import Linear, annotated_param, table_init


class PositionTable(nnx.Variable):
    """A fixed (non-trainable) table that is still saved in checkpoints (docs/model.md §2.1 'frozen pos tables')."""


def sincos_2d_table(side: int, dim: int) -> np.ndarray:
    """(side², dim) table, row r*side+c = [sin(c·ω), cos(c·ω), sin(r·ω), cos(r·ω)], ω in float64
    (docs/model.md §3.7)."""
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


def timestep_features(t, dim: int = 256):
    """DiT frequency features of raw t ∈ [0, 1] (not ×1000), cosine first (docs/model.md §3.9)."""
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
    """Gather latent tokens (V, p·p·C) in (py, px, c) order from latents (N, Hl, Wl, C) (docs/model.md §3.10)."""
    offsets = jnp.arange(patch)
    rows = patch * row[:, None] + offsets[None, :]
    cols = patch * col[:, None] + offsets[None, :]
    tokens = latents[image[:, None, None], rows[:, :, None], cols[:, None, :], :]  # (V, p, p, C)
    return tokens.reshape(tokens.shape[0], patch * patch * latents.shape[-1])  # explicit: V may be 0


def shift_timestep(t, shift: float):
    """t ← s·t / (1 + (s−1)·t) (docs/model.md §3.11 step 3, docs/inference.md §5.3)."""
    return shift * t / (1.0 + (shift - 1.0) * t)
