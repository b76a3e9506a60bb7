"""Mixture-of-Transformers routing (docs/model.md §1.5): gather each expert's tokens into a static-capacity buffer, run
that expert only, scatter the results back. Padding slots hold the index T (one past the end) and are dropped.

The experts' real slots name distinct tokens (each token has one expert), so routing is a partial permutation:
`route` (tokens -> buffers) and `unroute` (buffers -> tokens) are each other's transpose, and each one's gradient is
the other one, computed as a gather. Autodiff would instead zero a full-size array and scatter-add into it for every
gather, and `unroute` written as a scatter would zero one per call as well (docs/model.md §1.5).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _take(x, index):
    return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


def _slot_of_token(indexes, length):
    """(length,) int32: each token's slot in the concatenated buffers; tokens in no buffer get one past the end."""
    slots = jnp.concatenate(indexes)
    total = slots.shape[0]
    return jnp.full((length,), total, jnp.int32).at[slots].set(jnp.arange(total, dtype=jnp.int32), mode="drop")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _route(x, indexes, length):
    return tuple(_take(x, index) for index in indexes)


def _route_fwd(x, indexes, length):
    return _route(x, indexes, length), indexes


def _route_bwd(length, indexes, d_buffers):
    return _unroute(tuple(d_buffers), indexes, length), tuple(None for _ in indexes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _unroute(buffers, indexes, length):
    return _take(jnp.concatenate(buffers), _slot_of_token(indexes, length))


def _unroute_fwd(buffers, indexes, length):
    return _unroute(buffers, indexes, length), indexes


def _unroute_bwd(length, indexes, d_tokens):
    return _route(d_tokens, indexes, length), tuple(None for _ in indexes)


_route.defvjp(_route_fwd, _route_bwd)
_unroute.defvjp(_unroute_fwd, _unroute_bwd)


def route(x, indexes):
    """Per-expert buffers of tokens x (T, ...): rows at each index (C_e,), zeros in padding slots; [None] = every
    token to one expert (x itself)."""
    if len(indexes) == 1 and indexes[0] is None:
        return [x]
    return list(_route(x, tuple(indexes), x.shape[0]))


def unroute(buffers, indexes, length):
    """Inverse of route: a (length, ...) array with each buffer's rows at its indexes (zeros for tokens in none)."""
    if len(indexes) == 1 and indexes[0] is None:
        return buffers[0]
    dtype = jnp.result_type(*buffers)
    return _unroute(tuple(b.astype(dtype) for b in buffers), tuple(indexes), length)


def apply_experts(experts, x, indexes, fn):
    """Run fn(expert, tokens) for each (expert, index) pair on its own tokens and reassemble the sequence."""
    outs = [fn(expert, buffer) for expert, buffer in zip(experts, route(x, indexes))]
    return unroute(outs, indexes, x.shape[0])
