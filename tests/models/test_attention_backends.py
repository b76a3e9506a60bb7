"""Every fast attention backend equals the dense reference (docs/packed_sequence.md §4.3, §4.7): forward and gradients
on randomised packs, under vmap, in bf16, for the ViT's image segments and for a cache-shaped call."""

import attention_cases as cases
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimedvl_jax.models.attention import packed_attention, segment_meta
from unimedvl_jax.packed_batch import CAUSAL, FULL, NOISE

BACKENDS = ["chunked", "blocksparse", "cpu_ffi"]


def random_meta(seed: int, pad_to: int | None = None):
    """TokenMeta of a randomised pack of 2-4 samples (every split kind, trailing padding)."""
    return cases.random_meta(seed, (2, 5), pad_to)


def value_and_grads(name, q, k, v, cot, q_meta, k_meta, block_size):
    """(output, (dq, dk, dv)) of backend `name`."""
    return cases.value_and_grads(cases.backend(name, q_meta, k_meta, block_size=block_size), q, k, v, cot)


def assert_matches_dense(name, q, k, v, cot, q_meta, k_meta, block_size, atol=1e-5):
    cases.assert_close(value_and_grads(name, q, k, v, cot, q_meta, k_meta, block_size),
                       value_and_grads("dense", q, k, v, cot, q_meta, k_meta, block_size), atol)


def test_random_packs_cover_every_split_kind():
    """The generator really produces causal, full and noise splits, images at sample edges, and padding."""
    modes = set()
    for seed in range(4):
        meta = random_meta(seed)
        modes |= {int(m) for m in meta.mode}
        assert int(meta.sample[-1]) == int(meta.sample.max()), "trailing padding sample"
    assert modes == {CAUSAL, FULL, NOISE}


@pytest.mark.parametrize("block_size", [16, 24])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_dense_on_random_packs(backend, seed, block_size):
    """Forward and dq, dk, dv within 1e-5 (fp32), GQA 4 / 2 heads, lengths not divisible by the block size."""
    meta = random_meta(seed)
    q, k, v, cot = cases.qkv(seed, meta.length)
    assert_matches_dense(backend, q, k, v, cot, meta, meta, block_size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_under_vmap_over_packs(backend):
    """Two different packs of one static length in a vmapped, differentiated call (as in the train step)."""
    metas = [random_meta(seed, pad_to=120) for seed in (5, 6)]
    meta = jax.tree.map(lambda *a: jnp.stack(a), *metas)
    q, k, v, cot = cases.qkv(7, 2 * 120)
    q, k, v, cot = (x.reshape((2, 120) + x.shape[1:]) for x in (q, k, v, cot))

    def run(backend):
        def loss(q, k, v):
            out = jax.vmap(lambda *a: packed_attention(*a, backend=backend, block_size=32))(q, k, v, meta, meta)
            return jnp.sum(out * cot), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, out_ref), grads_ref = run("dense")
    (_, out), grads = run(backend)
    np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=0)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_on_vit_segments(backend):
    """Bidirectional attention within images (the ViT's segment_meta)."""
    meta = segment_meta(np.repeat(np.arange(4), [9, 30, 1, 17]))
    q, k, v, cot = cases.qkv(3, meta.length, hq=2, hkv=2)
    assert_matches_dense(backend, q, k, v, cot, meta, meta, block_size=16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_on_cache_shaped_call(backend):
    """A chunk of new queries against a static cache (filled prefix, the chunk written in place, empty slots after),
    as KV-cache prefill and decoding call it."""
    cache_len, filled, chunk = 96, 37, 11
    q_meta, k_meta = cases.cache_metas(cache_len, filled, chunk)
    q, k, v, cot = cases.qkv(4, chunk, tk=cache_len)
    assert_matches_dense(backend, q, k, v, cot, q_meta, k_meta, block_size=16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_bf16_error_is_that_of_dense_bf16(backend):
    """In bf16 the backend's error against fp32 dense is within 2× the dense bf16 backend's own error."""
    meta = random_meta(11)
    q, k, v, cot = cases.qkv(11, meta.length)
    ref, _ = value_and_grads("dense", q, k, v, cot, meta, meta, 32)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    dense_err = float(jnp.abs(value_and_grads("dense", *low, cot, meta, meta, 32)[0].astype(jnp.float32) - ref).max())
    err = float(jnp.abs(value_and_grads(backend, *low, cot, meta, meta, 32)[0].astype(jnp.float32) - ref).max())
    assert 0 < dense_err < 0.1
    assert err <= 2 * dense_err + 1e-3, (err, dense_err)
