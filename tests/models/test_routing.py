"""MoT routing (models/routing.py): route / unroute and their hand-written gradients equal plain autodiff of the
gather / scatter they replace, with padding slots and tokens that belong to no expert."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimedvl_jax.models.routing import apply_experts, route, unroute

LENGTH = 13


def _indexes(seed):
    """und / gen buffers over a random split of the tokens (some in neither), padded with LENGTH."""
    rng = np.random.default_rng(seed)
    owner = rng.integers(0, 3, LENGTH)  # 0 und, 1 gen, 2 no expert (e.g. pack padding)
    und, gen = np.flatnonzero(owner == 0), np.flatnonzero(owner == 1)
    pad = lambda idx, cap: np.concatenate([idx, np.full(cap - len(idx), LENGTH)]).astype(np.int32)  # noqa: E731
    return [jnp.asarray(pad(und, len(und) + 3)), jnp.asarray(pad(gen, len(gen) + 2))]


def _naive_route(x, indexes):
    return [jnp.take(x, idx, axis=0, mode="fill", fill_value=0) for idx in indexes]


def _naive_unroute(buffers, indexes, length):
    out = jnp.zeros((length,) + buffers[0].shape[1:], buffers[0].dtype)
    for buf, idx in zip(buffers, indexes):
        out = out.at[idx].set(buf, mode="drop")
    return out


@pytest.mark.parametrize("seed", range(4))
def test_route_and_unroute_match_gather_and_scatter_with_gradients(seed):
    indexes = _indexes(seed)
    rng = np.random.default_rng(100 + seed)
    x = jnp.asarray(rng.standard_normal((LENGTH, 5)), jnp.float32)
    buffers = [jnp.asarray(rng.standard_normal((idx.shape[0], 5)), jnp.float32) for idx in indexes]

    got, got_vjp = jax.vjp(lambda t: route(t, indexes), x)
    want, want_vjp = jax.vjp(lambda t: _naive_route(t, indexes), x)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    cot = [jnp.asarray(rng.standard_normal(b.shape), jnp.float32) for b in want]
    np.testing.assert_array_equal(got_vjp(cot)[0], want_vjp(cot)[0])

    got, got_vjp = jax.vjp(lambda *b: unroute(list(b), indexes, LENGTH), *buffers)
    want, want_vjp = jax.vjp(lambda *b: _naive_unroute(list(b), indexes, LENGTH), *buffers)
    np.testing.assert_array_equal(got, want)
    cot = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    for a, b in zip(got_vjp(cot), want_vjp(cot)):
        np.testing.assert_array_equal(a, b)


def test_apply_experts_gradient_under_vmap_and_jit():
    packs = [_indexes(seed) for seed in (7, 8)]
    # same capacities per pack, as the batcher stacks them
    caps = [max(p[e].shape[0] for p in packs) for e in range(2)]
    stacked = [jnp.stack([jnp.pad(p[e], (0, caps[e] - p[e].shape[0]), constant_values=LENGTH) for p in packs])
               for e in range(2)]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, LENGTH, 4)), jnp.float32)
    weights = [jnp.float32(2.0), jnp.float32(-3.0)]

    def loss(fn, x, w):
        def one(xp, idx):
            return fn(xp, list(idx), w)
        return jnp.sum(jax.vmap(one)(x, tuple(stacked)) ** 2)

    ours = lambda xp, idx, w: apply_experts(w, xp, idx, lambda e, t: jnp.tanh(t) * e)  # noqa: E731
    naive = lambda xp, idx, w: _naive_unroute([jnp.tanh(t) * e for e, t in zip(w, _naive_route(xp, idx))],  # noqa: E731
                                              idx, LENGTH)
    got = jax.jit(jax.grad(lambda x, w: loss(ours, x, w), argnums=(0, 1)))(x, weights)
    want = jax.grad(lambda x, w: loss(naive, x, w), argnums=(0, 1))(x, weights)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)


def test_single_expert_is_identity():
    x = jnp.arange(6.0).reshape(3, 2)
    assert route(x, [None])[0] is x
    assert unroute([x], [None], 3) is x
