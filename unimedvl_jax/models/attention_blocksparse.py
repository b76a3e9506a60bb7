"""Block-sparse packed attention in plain JAX: the portable fast path, default on CPU (docs/packed_sequence.md §4.7).

Queries and keys are cut into blocks. Each query block visits only the key blocks between the first and the last key
slot its queries may see (`key_ranges`: from the start of the query's sample to itself, or to the end of its image
block), so the cost follows Σ sample_len² (times a block-rounding factor), not pack_len², and no pack × pack array is
ever formed: scores exist one (query block × key block) tile at a time.

The loop runs over band offsets j = 0, 1, ...: step j processes, for every query block i at once, key block
first_block[i] + j (one batched matmul over all query blocks, which keeps the work in large, efficient operations),
until every query block has passed its last key block. The trip count is dynamic (the widest query block's span),
so the forward and backward passes are a `jax.lax.while_loop` each, tied together by a `jax.custom_vjp` with the
flash-attention recurrences: the forward keeps (out, log-sum-exp), the backward recomputes each tile's probabilities
and scatter-adds dK / dV into the visited key blocks. Inside a tile the §4.3 mask is recomputed from the metadata, so
the result equals the dense reference up to summation order.

Preconditions (attention_mask.py): key slot s holds sequence index s, and samples and splits are contiguous runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from unimedvl_jax.models.attention_mask import FAR_INDEX, TokenMeta, allowed, key_ranges, pad_meta, pad_tokens


def _blocks(x, size, fill):
    """(T, ...) -> (T/size, size, ...), padding T up to a multiple of `size` with `fill` (no copy when it divides)."""
    x = pad_tokens(x, -(-x.shape[0] // size) * size, fill)
    return x.reshape((-1, size) + x.shape[1:])


def _meta_blocks(meta: TokenMeta, size: int, pad_sample: int) -> TokenMeta:
    """TokenMeta split into blocks; padding tokens get a sample id nothing else has (invisible, see nothing)."""
    padded = pad_meta(meta, -(-meta.length // size) * size, sample=pad_sample)
    return jax.tree.map(lambda a: a.reshape(-1, size), padded)


def block_spans(q_meta: TokenMeta, k_meta: TokenMeta, q_block: int, k_block: int):
    """(first key block, last key block) per query block (padding queries excluded), and the number of band steps
    (the widest span)."""
    first, last = key_ranges(q_meta, k_meta)
    first = _blocks(first, q_block, FAR_INDEX).min(axis=1) // k_block
    last = _blocks(last, q_block, -1).max(axis=1) // k_block
    steps = jnp.maximum(jnp.max(last - first + 1), 0)
    return first, last, steps


def _tile_mask(qm: TokenMeta, km: TokenMeta, active):
    """(n, Bq, Bk) §4.3 mask of each query block against its current key block; inactive blocks fully masked."""
    return jax.vmap(allowed)(qm, km) & active[:, None, None]


def _tile_scores(qb, kt, scale):
    """Scores (n, Hkv, G, Bq, Bk) in fp32 of query blocks (n, Hkv, G, Bq, D) against key tiles (n, Bk, Hkv, D)."""
    return jnp.einsum("nhgqd,nkhd->nhgqk", qb, kt, preferred_element_type=jnp.float32) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attend(qb, kb, vb, qm, km, spans, scale):
    """Blocked attention; qb (nq, Hkv, G, Bq, D), kb/vb (nk, Bk, Hkv, D) -> (nq, Hkv, G, Bq, D)."""
    return _forward(qb, kb, vb, qm, km, spans, scale)[0]


def _gather(kb, vb, km, first, last, j):
    """Key / value tiles, their metadata and the active flag of band step j for every query block."""
    want = first + j
    active = want <= last
    idx = jnp.clip(want, 0, kb.shape[0] - 1)
    return idx, kb[idx], vb[idx], jax.tree.map(lambda a: a[idx], km), active


def _forward(qb, kb, vb, qm, km, spans, scale):
    first, last, steps = spans
    nq, hkv, g, bq, d = qb.shape

    def body(carry):
        j, m, l, acc = carry
        _, kt, vt, kmt, active = _gather(kb, vb, km, first, last, j)
        mask = _tile_mask(qm, kmt, active)[:, None, None]
        s = jnp.where(mask, _tile_scores(qb, kt, scale), -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])  # exactly 0 where masked
        correction = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
        pv = jnp.einsum("nhgqk,nkhd->nhgqd", p.astype(vt.dtype), vt, preferred_element_type=jnp.float32)
        return j + 1, m_new, l * correction + p.sum(axis=-1), acc * correction[..., None] + pv

    init = (jnp.zeros((), jnp.int32), jnp.full((nq, hkv, g, bq), -jnp.inf, jnp.float32),
            jnp.zeros((nq, hkv, g, bq), jnp.float32), jnp.zeros((nq, hkv, g, bq, d), jnp.float32))
    _, m, l, acc = jax.lax.while_loop(lambda c: c[0] < steps, body, init)
    seen = l > 0  # rows that see no key at all (padding) give 0 and no gradient
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
    return out.astype(qb.dtype), (qb, kb, vb, qm, km, spans, out, lse)


def _attend_bwd(scale, res, d_out):
    qb, kb, vb, qm, km, spans, out, lse = res
    first, last, steps = spans
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out, axis=-1)  # (nq, Hkv, G, Bq): rowsum(dO ∘ O)

    def body(carry):
        j, dq, dk, dv = carry
        idx, kt, vt, kmt, active = _gather(kb, vb, km, first, last, j)
        mask = _tile_mask(qm, kmt, active)[:, None, None]
        p = jnp.where(mask, jnp.exp(_tile_scores(qb, kt, scale) - lse[..., None]), 0.0)
        dp = jnp.einsum("nhgqd,nkhd->nhgqk", d_out, vt, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("nhgqk,nkhd->nhgqd", ds, kt, preferred_element_type=jnp.float32)
        dk = dk.at[idx].add(jnp.einsum("nhgqk,nhgqd->nkhd", ds, qb, preferred_element_type=jnp.float32))
        dv = dv.at[idx].add(jnp.einsum("nhgqk,nhgqd->nkhd", p, d_out, preferred_element_type=jnp.float32))
        return j + 1, dq, dk, dv

    init = (jnp.zeros((), jnp.int32), jnp.zeros(qb.shape, jnp.float32), jnp.zeros(kb.shape, jnp.float32),
            jnp.zeros(vb.shape, jnp.float32))
    _, dq, dk, dv = jax.lax.while_loop(lambda c: c[0] < steps, body, init)
    no_grad = jax.tree.map(lambda a: None, (qm, km, spans))
    return (dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype)) + no_grad


_attend.defvjp(_forward, _attend_bwd)


def blocksparse_attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, scale: float, block_size: int):
    """Softmax attention of q (Tq, Hq, D) over k, v (Tk, Hkv, D) under the §4.3 mask, visiting only the key blocks
    each query block can see."""
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    g = hq // hkv
    q_block, k_block = min(block_size, tq), min(block_size, tk)
    # (nq, Bq, Hkv, G, D) -> (nq, Hkv, G, Bq, D): one batched matmul per (block, KV head) with G·Bq rows.
    qb = _blocks(q.reshape(tq, hkv, g, d), q_block, 0).transpose(0, 2, 3, 1, 4)
    kb, vb = _blocks(k, k_block, 0), _blocks(v, k_block, 0)
    qm = _meta_blocks(q_meta, q_block, pad_sample=-4)
    km = _meta_blocks(k_meta, k_block, pad_sample=-5)
    spans = block_spans(q_meta, k_meta, q_block, k_block)
    out = _attend(qb, kb, vb, qm, km, spans, scale)
    return out.transpose(0, 3, 1, 2, 4).reshape(-1, hq, d)[:tq]
