"""Shared inputs and checks of the attention backend tests (docs/packed_sequence.md §4.3, §4.7): random packs, cache
layouts, q / k / v, a jitted value-and-gradients harness and the comparison against the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np

from unimedvl_jax.inference.kv_cache import EMPTY_SAMPLE
from unimedvl_jax.models.attention import TokenMeta, packed_attention
from unimedvl_jax.packed_batch import CAUSAL, FULL
from unimedvl_jax.testing import build_packed_batch, random_pack_samples, small_model_config


def pack_meta(batch) -> TokenMeta:
    """The attention metadata of a PackedBatch (index = position)."""
    return TokenMeta(jnp.asarray(batch.sample_id), jnp.asarray(batch.split_id), jnp.asarray(batch.split_mode),
                     jnp.arange(batch.num_tokens, dtype=jnp.int32))


def random_pack(seed: int, num_samples, pad_to: int | None = None):
    """A randomised PackedBatch (every split kind, images opening and closing samples) with trailing padding: to
    `pad_to` tokens, or 1-13 tokens past the real ones. num_samples: a count or a (low, high) range to draw from."""
    rng = np.random.default_rng(seed)
    if not isinstance(num_samples, int):
        num_samples = int(rng.integers(*num_samples))
    samples = random_pack_samples(rng, num_samples=num_samples)
    if pad_to is None:
        pad_to = build_packed_batch(samples, small_model_config(), rng=seed)[0].num_tokens + int(rng.integers(1, 14))
    return build_packed_batch(samples, small_model_config(), rng=seed, pad_to=pad_to)[0]


def random_meta(seed: int, num_samples, pad_to: int | None = None) -> TokenMeta:
    """pack_meta of random_pack."""
    return pack_meta(random_pack(seed, num_samples, pad_to))


def cache_metas(cache_len: int, filled: int, chunk: int):
    """(query meta, key meta) of a chunk written in place into a static cache: a causal split, a full split up to
    `filled`, the chunk's causal split, then empty slots (as KV-cache prefill and decoding call attention)."""
    index = np.arange(cache_len, dtype=np.int32)
    sample = np.where(index < filled + chunk, 0, EMPTY_SAMPLE).astype(np.int32)
    split = np.where(index < 20, 0, np.where(index < filled, 1, 2)).astype(np.int32)
    mode = np.where((index >= 20) & (index < filled), FULL, CAUSAL).astype(np.int32)
    k_meta = TokenMeta(*map(jnp.asarray, (sample, split, mode, index)))
    return k_meta[filled:filled + chunk], k_meta


def qkv(seed, t, hq=4, hkv=2, d=16, tk=None):
    """Random q (t, hq, d), k / v (tk, hkv, d) and an output cotangent, fp32."""
    ks = jax.random.split(jax.random.key(seed), 4)
    tk = t if tk is None else tk
    return (jax.random.normal(ks[0], (t, hq, d)), jax.random.normal(ks[1], (tk, hkv, d)),
            jax.random.normal(ks[2], (tk, hkv, d)), jax.random.normal(ks[3], (t, hq, d)))


def value_and_grads(attend, q, k, v, cot):
    """(output, (dq, dk, dv)) of Σ out·cot for attend(q, k, v), jitted."""
    def loss(q, k, v):
        out = attend(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * cot), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def backend(name, q_meta, k_meta, **kwargs):
    """attend(q, k, v) with packed_attention's backend `name` over fixed metadata."""
    return lambda q, k, v: packed_attention(q, k, v, q_meta, k_meta, backend=name, **kwargs)


def dense(q_meta, k_meta, scale=None):
    """The dense reference as attend(q, k, v)."""
    return backend("dense", q_meta, k_meta, scale=scale)


def assert_close(got, want, atol=1e-5):
    """Outputs and every gradient of two value_and_grads results equal within atol; the reference is not trivial."""
    (out, grads), (out_ref, grads_ref) = got, want
    assert float(jnp.abs(out_ref).max()) > 0.1
    np.testing.assert_allclose(out, out_ref, atol=atol, rtol=0, err_msg="output")
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert float(jnp.abs(g_ref).max()) > 1e-3, f"d/d{name} is trivially zero"
        np.testing.assert_allclose(g, g_ref, atol=atol, rtol=0, err_msg=f"d/d{name}")
