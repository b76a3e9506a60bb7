"""The pallas_gpu flash-attention kernel (interpret mode on CPU) against the dense reference under the
docs/packed_sequence.md §4.3 mask: values and gradients, GQA, padding, cross-attention, vmap and bf16."""

import attention_cases as cases
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import assert_close, dense, value_and_grads

from unimedvl_jax.models.attention_mask import allowed, key_ranges
from unimedvl_jax.models.attention_pallas_gpu import _query_spans, pallas_gpu_attention
from unimedvl_jax.packed_batch import CAUSAL, FULL, NOISE, TEXT, VAE, VIT

HQ, HKV, D = 4, 2, 16


def _random_pack(seed, length):
    """Metadata of a random pack of 4 samples (text, ViT, clean and noised VAE splits, an image block opening the first
    sample and closing the last) padded with a causal pad sample to `length`."""
    batch = cases.random_pack(seed, 4, pad_to=length)
    splits = set(zip(np.asarray(batch.token_kind).tolist(), np.asarray(batch.split_mode).tolist()))
    assert {(TEXT, CAUSAL), (VIT, FULL), (VAE, FULL), (VAE, NOISE)} <= splits, f"seed {seed} misses a split kind"
    assert np.asarray(batch.sample_id)[-1] != np.asarray(batch.sample_id)[0], "no trailing padding"
    return cases.pack_meta(batch)


def _inputs(seed, tq, tk):
    return cases.qkv(seed, tq, HQ, HKV, D, tk=tk)


def _pallas(q_meta, k_meta, block_size):
    return lambda q, k, v: pallas_gpu_attention(q, k, v, q_meta, k_meta, scale=D**-0.5, block_size=block_size,
                                                interpret=True)


@pytest.mark.parametrize("seed,length,block_size", [(0, 150, 16), (4, 203, 32)])
def test_self_attention_matches_dense(seed, length, block_size):
    """Values and gradients w.r.t. q, k, v equal the dense backend (1e-5, fp32) on a random pack with GQA and a
    length that is not a multiple of the block size."""
    assert length % block_size
    meta = _random_pack(seed, length)
    q, k, v, cot = _inputs(seed, length, length)
    assert_close(value_and_grads(_pallas(meta, meta, block_size), q, k, v, cot),
                  value_and_grads(dense(meta, meta), q, k, v, cot), atol=1e-5)


def test_cross_attention_matches_dense():
    """Queries that are the tail of the pack (as with a KV cache) over all its keys: the query ranges of the dK/dV
    kernel then come from the hull of the key ranges."""
    meta = _random_pack(4, 140)
    q_meta = meta[60:]
    q, k, v, cot = _inputs(1, q_meta.length, meta.length)
    assert_close(value_and_grads(_pallas(q_meta, meta, 16), q, k, v, cot),
                  value_and_grads(dense(q_meta, meta), q, k, v, cot), atol=1e-5)


@pytest.mark.parametrize("cross", [False, True])
def test_query_spans_cover_the_mask(cross):
    """Every query that may see a key lies in the key's query span (the dK/dV kernel's loop), and for
    self-attention the span is tight: both ends are queries that do see the key."""
    meta = _random_pack(0, 150)
    q_meta = meta[40:] if cross else meta
    first, last = (np.asarray(a) for a in _query_spans(q_meta, meta, *key_ranges(q_meta, meta)))
    mask = np.asarray(allowed(q_meta, meta))
    rows = np.arange(q_meta.length)[:, None]
    assert not (mask & ((rows < first) | (rows > last))).any()
    if not cross:
        keys = np.arange(meta.length)
        assert mask[first, keys].all() and mask[last, keys].all()


def test_vmap_over_packs_matches_dense():
    """Under jax.vmap over two packs with different layouts (as in the train step)."""
    metas = [_random_pack(seed, 120) for seed in (0, 5)]
    meta = jax.tree.map(lambda *a: jnp.stack(a), *metas)
    q, k, v, cot = (jnp.stack(x) for x in zip(*(_inputs(s, 120, 120) for s in (5, 6))))

    def batched(attend):
        def run(q, k, v, meta):
            return attend(meta)(q, k, v)
        return lambda q, k, v: jax.vmap(run)(q, k, v, meta)

    assert_close(value_and_grads(batched(lambda m: _pallas(m, m, 16)), q, k, v, cot),
                  value_and_grads(batched(lambda m: dense(m, m)), q, k, v, cot), atol=1e-5)


def test_bf16_error_within_dense_bf16_error():
    """bf16 inputs: the kernel's error against the fp32 dense reference (values and gradients) is at most 1.5× the
    dense bf16 backend's own. Both see the same bf16-rounded q, k, v, accumulate in fp32 and round their results to
    bf16, which dominates the error (measured ratios 0.7-1.0); they differ only in where the probabilities are rounded
    for the P·V product (unnormalised per tile vs normalised). A wrong mask, lse or GQA grouping would be O(1) off."""
    meta = _random_pack(2, 150)
    q, k, v, cot = _inputs(2, 150, 150)
    ref = value_and_grads(dense(meta, meta), q, k, v, cot)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    dense_bf16 = value_and_grads(dense(meta, meta), *bf16, cot)
    kernel = value_and_grads(_pallas(meta, meta, 32), *bf16, cot)
    for name, r, d, kn in zip(["output", "dq", "dk", "dv"], [ref[0], *ref[1]], [dense_bf16[0], *dense_bf16[1]],
                              [kernel[0], *kernel[1]]):
        assert kn.dtype == jnp.bfloat16
        err_kernel, err_dense = (float(jnp.abs(x.astype(jnp.float32) - r).max()) for x in (kn, d))
        assert err_kernel <= 1.5 * err_dense, f"{name}: kernel {err_kernel:.3g} vs dense bf16 {err_dense:.3g}"
