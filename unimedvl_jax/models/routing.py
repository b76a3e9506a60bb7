"""Mixture-of-Transformers routing (docs/model.md §1.5): gather each expert's tokens into a static-capacity buffer, run
that expert only, scatter the results back. Padding slots hold the index T (one past the end) and are dropped."""

from __future__ import annotations

import jax.numpy as jnp


def gather_tokens(x, index):
    """Rows of x (T, ...) at `index` (C,); out-of-range slots read zeros. index=None means all tokens."""
    if index is None:
        return x
    return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


def scatter_tokens(buffers, indexes, length):
    """Inverse of gather_tokens over several experts: a (length, ...) array with each buffer at its indexes."""
    if len(indexes) == 1 and indexes[0] is None:
        return buffers[0]
    out = jnp.zeros((length,) + buffers[0].shape[1:], buffers[0].dtype)
    for buf, idx in zip(buffers, indexes):
        out = out.at[idx].set(buf.astype(out.dtype), mode="drop")
    return out


def apply_experts(experts, x, indexes, fn):
    """Run fn(expert, tokens) for each (expert, index) pair on its own tokens and reassemble the sequence."""
    outs = [fn(expert, gather_tokens(x, idx)) for expert, idx in zip(experts, indexes)]
    return scatter_tokens(outs, indexes, x.shape[0])
