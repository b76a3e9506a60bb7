"""Static-shape KV cache and context updates (docs/inference.md §5.1).

A context holds, per layer, K and V of every cached token *after* k-norm and RoPE, plus the tokens' attention
metadata (sample / split / mode / index) so new tokens attend under the same docs/packed_sequence.md §4.3 rules as in
training. Appending a chunk of n tokens runs the LLM on the chunk against the cache and writes the chunk's K/V after the
cached ones. Causality is bottom-right aligned as in flash-attn (docs/quirks.md §9.10): new token i sees the whole cache
and new tokens ≤ i. Shapes are static: the cache has `max_len` slots, chunks are padded to a bucket, so prefill compiles
once per bucket and decoding compiles once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from unimedvl_jax.models.attention import TokenMeta
from unimedvl_jax.packed_batch import CAUSAL, VAE

EMPTY_SAMPLE = -2   # cache slots not yet written: no query can see them
PAD_SAMPLE = -3     # padding inside an appended chunk


@struct.dataclass
class KVCache:
    """Per-layer keys/values (L, S, Hkv, D), their TokenMeta over S, the fill length and the next split id.

    A batch of caches is the same pytree with a leading batch axis on every leaf.
    """

    keys: jax.Array
    values: jax.Array
    meta: TokenMeta
    length: jax.Array
    next_split: jax.Array

    @property
    def max_len(self) -> int:
        return self.keys.shape[-3]


def empty_cache(llm_cfg, max_len: int, dtype=jnp.float32) -> KVCache:
    """A cache with `max_len` empty slots (kv_len 0)."""
    head_dim = llm_cfg.hidden_size // llm_cfg.num_heads
    shape = (llm_cfg.num_layers, max_len, llm_cfg.num_kv_heads, head_dim)
    meta = TokenMeta(jnp.full((max_len,), EMPTY_SAMPLE, jnp.int32), jnp.full((max_len,), -1, jnp.int32),
                     jnp.full((max_len,), CAUSAL, jnp.int32), jnp.full((max_len,), 2**30, jnp.int32))
    zero = jnp.zeros((), jnp.int32)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), meta, zero, zero)


def bucket(n: int, minimum: int = 16) -> int:
    """Static chunk length for n tokens: the next power of two ≥ max(n, minimum)."""
    size = minimum
    while size < n:
        size *= 2
    return size


def append_chunk(model, cache: KVCache, embeds, kinds, positions, mode, n_valid, *, advance_cache: bool = True):
    """Run the LLM on one chunk (n padded tokens, the first n_valid real) against the cache (not jitted).

    kinds: token kinds (TEXT/VIT markers use the und expert, VAE latents the gen expert); positions: rope ids;
    mode: split mode of the chunk (one split). Returns (new cache, hidden states of the chunk after the final
    norms). With advance_cache=False the cache is returned unchanged (the `generate image` query,
    docs/inference.md §5.1).
    """
    lm = model.language_model
    n = embeds.shape[0]
    real = jnp.arange(n) < n_valid
    meta = TokenMeta(jnp.where(real, 0, PAD_SAMPLE).astype(jnp.int32),
                     jnp.full((n,), cache.next_split, jnp.int32), jnp.full((n,), mode, jnp.int32),
                     (cache.length + jnp.arange(n)).astype(jnp.int32))
    und = jnp.nonzero(real & (kinds != VAE), size=n, fill_value=n)[0].astype(jnp.int32)
    gen = jnp.nonzero(real & (kinds == VAE), size=n, fill_value=n)[0].astype(jnp.int32)
    hidden, _, kvs = lm(embeds, positions, meta, [und, gen], backend=model.cfg.attention_backend,
                                block_size=model.cfg.attention_block_size,
                                past=(cache.keys, cache.values, cache.meta))
    if not advance_cache:
        return cache, hidden
    new_k = jnp.stack([k for k, _ in kvs]).astype(cache.keys.dtype)
    new_v = jnp.stack([v for _, v in kvs]).astype(cache.values.dtype)
    start = cache.length
    keys = jax.lax.dynamic_update_slice(cache.keys, new_k, (0, start, 0, 0))
    values = jax.lax.dynamic_update_slice(cache.values, new_v, (0, start, 0, 0))
    written = TokenMeta(jnp.where(real, 0, EMPTY_SAMPLE).astype(jnp.int32), meta.split, meta.mode, meta.index)
    new_meta = jax.tree.map(lambda old, new: jax.lax.dynamic_update_slice(old, new, (start,)), cache.meta, written)
    return KVCache(keys, values, new_meta, cache.length + n_valid, cache.next_split + 1), hidden


# Compiles once per (chunk bucket, cache size).
append = nnx.jit(append_chunk, static_argnames=("advance_cache",))
