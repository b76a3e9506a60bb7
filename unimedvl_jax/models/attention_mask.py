"""The packed attention mask of docs/packed_sequence.md §4.3 and the per-token key / query ranges that block-sparse
backends derive from it (docs/packed_sequence.md §4.7).

The mask is never stored: every backend recomputes it from per-token metadata (sample id, split id, split mode,
sequence index). Block-sparse backends additionally need, for each query, the contiguous range of key slots that may
be visible to it (and, for the backward pass, the range of queries that may see each key). Those ranges rely on the
packing layout: every sample's tokens are one contiguous run, every split is a contiguous run inside its sample, and a
key's sequence index is its slot (`index == arange`). Packs from the packer, the ViT's image segments and the in-place
KV cache all satisfy this; `dense` and `chunked` do not need it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from unimedvl_jax.packed_batch import CAUSAL, FULL, NOISE

MASKED = -1e30  # finite "minus infinity": exp underflows to exactly 0 and fully masked rows stay finite.
FAR_INDEX = 2**30  # sequence index of padding tokens: after every real token


@struct.dataclass
class TokenMeta:
    """Per-token attention metadata: sample (document) id, split id, split mode and sequence index."""

    sample: jax.Array
    split: jax.Array
    mode: jax.Array
    index: jax.Array

    def __getitem__(self, sl):
        return TokenMeta(self.sample[sl], self.split[sl], self.mode[sl], self.index[sl])

    @property
    def length(self) -> int:
        return self.sample.shape[0]


def segment_meta(segment_ids) -> TokenMeta:
    """Metadata for plain bidirectional attention within segments (e.g. one ViT image per segment)."""
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    n = segment_ids.shape[0]
    return TokenMeta(segment_ids, segment_ids, jnp.full((n,), FULL, jnp.int32), jnp.arange(n, dtype=jnp.int32))


def pad_tokens(x, length: int, fill):
    """x (T, ...) padded along its first axis to `length` rows of `fill` (x itself when T == length)."""
    x = jnp.asarray(x)
    pad = length - x.shape[0]
    if pad == 0:
        return x
    return jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], fill, x.dtype)])


def pad_meta(meta: TokenMeta, length: int, *, sample: int, split: int = -1) -> TokenMeta:
    """TokenMeta padded to `length` tokens of causal mode at FAR_INDEX with the given sample / split ids (a sample id
    no real token has makes padding invisible to real queries)."""
    return TokenMeta(pad_tokens(meta.sample, length, sample), pad_tokens(meta.split, length, split),
                     pad_tokens(meta.mode, length, CAUSAL), pad_tokens(meta.index, length, FAR_INDEX))


def allowed(q: TokenMeta, k: TokenMeta):
    """Boolean (Tq, Tk) mask of docs/packed_sequence.md §4.3: same sample AND (k<=q OR same full/noise split) AND NOT
    foreign noise."""
    same_sample = q.sample[:, None] == k.sample[None, :]
    same_split = q.split[:, None] == k.split[None, :]
    causal = k.index[None, :] <= q.index[:, None]
    bidirectional = same_split & (q.mode[:, None] != CAUSAL)
    foreign_noise = (k.mode[None, :] == NOISE) & ~same_split
    return same_sample & (causal | bidirectional) & ~foreign_noise


_DIRECT_RANGE_PAIRS = 1 << 16  # key_ranges compares every (query, key) pair below this many pairs


def run_starts(ids):
    """For each position, the first position of the contiguous run of equal ids it belongs to."""
    n = ids.shape[0]
    pos = jnp.arange(n, dtype=jnp.int32)
    boundary = jnp.concatenate([jnp.ones((1,), bool), ids[1:] != ids[:-1]])
    return jax.lax.cummax(jnp.where(boundary, pos, 0))


def run_ends(ids):
    """For each position, the last position of the contiguous run of equal ids it belongs to."""
    n = ids.shape[0]
    pos = jnp.arange(n, dtype=jnp.int32)
    boundary = jnp.concatenate([ids[1:] != ids[:-1], jnp.ones((1,), bool)])
    return jax.lax.cummin(jnp.where(boundary, pos, n - 1), reverse=True)


def key_ranges(q: TokenMeta, k: TokenMeta):
    """(first, last) key slot (inclusive) each query may see: from the start of its sample's run to itself (causal)
    or to the end of its split (full / noise). Every allowed key lies inside; masked keys inside are still masked."""
    slot = jnp.clip(q.index, 0, k.length - 1)
    if q.length * k.length <= _DIRECT_RANGE_PAIRS:
        # A short chunk against a long cache (decoding): one pass of comparisons per query beats two scans.
        pos = jnp.arange(k.length, dtype=jnp.int32)
        same_sample = q.sample[:, None] == k.sample[None, :]
        first = jnp.min(jnp.where(same_sample, pos, k.length), axis=1)
        split_end = jnp.max(jnp.where(q.split[:, None] == k.split[None, :], pos, -1), axis=1)
        first = jnp.minimum(first, slot)
    else:
        first = run_starts(k.sample)[slot]
        split_end = run_ends(k.split)[slot]
    last = jnp.where(q.mode == CAUSAL, slot, jnp.maximum(split_end, slot))
    return first, last


def query_ranges(meta: TokenMeta):
    """(first, last) query position (inclusive) that may see each key, for self-attention over one packed sequence:
    from the start of the key's split (full / noise keys, seen by their whole split) or the key itself (causal keys)
    to the end of its sample (noise keys: to the end of their split)."""
    split_start, split_end = run_starts(meta.split), run_ends(meta.split)
    pos = jnp.arange(meta.length, dtype=jnp.int32)
    first = jnp.where(meta.mode == CAUSAL, pos, split_start)
    last = jnp.where(meta.mode == NOISE, split_end, run_ends(meta.sample))
    return first, last
