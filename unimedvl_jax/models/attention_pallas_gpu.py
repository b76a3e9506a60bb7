"""Packed attention as a flash-attention-2 Pallas kernel for GPU (Triton lowering), with block skipping driven by the
docs/packed_sequence.md §4.3 mask.

Forward: grid (query block, query head). Each program keeps its (Bq, D) query tile, its online-softmax state and its
output accumulator on chip and loops (`lax.fori_loop` with dynamic bounds) over the key blocks between the smallest
`first` and the largest `last` of its queries' `key_ranges` — so the cost follows Σ sample_len², not pack_len². Inside
each (Bq × Bk) tile the §4.3 mask is recomputed from the per-token metadata (sample, split, mode, index as int32
vectors), never stored. It writes the output and the per-row log-sum-exp.

Backward (`jax.custom_vjp`, FA2 recurrences with D_i = rowsum(dO∘O), P = exp(S − lse), dS = P∘(dP − D)):
* dK/dV kernel, grid (key block, KV head): loops over the query blocks that can see the key block (the hull of the
  queries' `key_ranges`, intersected with `query_ranges` when q_meta is k_meta) and, per query block,
  over the G query heads sharing the KV head (GQA: dK/dV summed over the group; the tile mask is shared by the group);
* dQ kernel, grid (query block, query head): loops over the same key blocks as the forward.

Padding: lengths are padded to the block sizes; padded keys get a sample id no query has (invisible), padded queries
one no key has (they see nothing: output 0, lse = +1e30, so P = 0 and no gradient flows). The head dim is zero-padded
to a power of two ≥ 16 (Triton tiles). Fully masked rows stay finite: scores use the finite MASKED value and the
probabilities of masked entries are exactly 0.

Why Pallas and not cuDNN (read in jax 0.10.2, `jax/_src/nn/functions.py::dot_product_attention` and
`jax/_src/cudnn/fused_attention_stablehlo.py`): `jax.nn.dot_product_attention(implementation='cudnn')` exposes only
`is_causal`, `query_seq_lengths` / `key_value_seq_lengths` (one valid length per batch row: a padding mask) and a
left `local_window_size`; it has no segment ids. The private cuDNN entry point additionally takes `q_offsets` /
`kv_offsets` (packed THD layout, Hopper+), but its mask types are only NO_MASK / PADDING / CAUSAL / PADDING_CAUSAL,
applied uniformly inside every segment. Our mask mixes causal text with bidirectional image splits that still see
their sample's past, and hides noised splits from later tokens: not expressible with segments (samples as segments
would need causal and full at once; splits as segments would cut the cross-split attention). The only remaining
route is `mask=` / `bias=`, which `combine_bias_and_mask` turns into a dense (…, T, S) additive bias in the query
dtype — the T × T materialisation we avoid, read in full by the kernel with no content-based block skipping. Hence
the Pallas kernel.

Preconditions (attention_mask.py): key slot s holds sequence index s; samples and splits are contiguous runs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from unimedvl_jax.models.attention_mask import (
    FAR_INDEX,
    MASKED,
    TokenMeta,
    allowed,
    key_ranges,
    pad_meta,
    pad_tokens,
    query_ranges,
)
from unimedvl_jax.sharding import trace_platform

_UNSEEN_LSE = -MASKED  # lse of a row that sees no key: exp(S - lse) is exactly 0 for every entry


class _Config(NamedTuple):
    scale: float
    block_q: int
    block_k: int
    group: int  # query heads per KV head
    interpret: bool


def _dot(a, b, contract=(1, 0)):
    """2-D matmul with fp32 accumulation, contracting a's axis contract[0] with b's axis contract[1]."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32)


def _block_range(span_refs, size):
    """[lo, hi) blocks of `size` covering the union of the (first, last) spans of the current block's tokens."""
    first, last = (r[...] for r in span_refs)
    return lax.div(jnp.min(first), size), lax.div(jnp.max(last) + size, size)


def _meta_at(meta_refs: TokenMeta, sl) -> TokenMeta:
    return TokenMeta(*(r[sl] for r in (meta_refs.sample, meta_refs.split, meta_refs.mode, meta_refs.index)))


def _scores(q, k, mask, scale):
    """Masked fp32 scores (Bq, Bk) of a query tile against a key tile."""
    return jnp.where(mask, _dot(q, k, (1, 1)) * scale, MASKED)


def _fwd_kernel(q_ref, k_ref, v_ref, qm_refs, km_refs, span_refs, o_ref, lse_ref, *, cfg: _Config):
    bq, bk = cfg.block_q, cfg.block_k
    q = q_ref[...]
    qm = _meta_at(qm_refs, ...)

    def body(j, carry):
        m, l, acc = carry
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        mask = allowed(qm, _meta_at(km_refs, ks))
        s = _scores(q, k_ref[ks, :], mask, cfg.scale)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)  # rows with nothing visible yet have m_new = MASKED
        correction = jnp.exp(m - m_new)
        v = v_ref[ks, :]
        return m_new, l * correction + jnp.sum(p, axis=1), acc * correction[:, None] + _dot(p.astype(v.dtype), v)

    init = (jnp.full((bq,), MASKED, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, q.shape[-1]), jnp.float32))
    m, l, acc = lax.fori_loop(*_block_range(span_refs, bk), body, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), _UNSEEN_LSE)


def _tile_grads(q, k, v, do, lse, delta, mask, scale):
    """P and dS of one tile (FA2): P = exp(S - lse) (0 where masked), dS = P∘(dO·Vᵀ - D)."""
    p = jnp.exp(_scores(q, k, mask, scale) - lse[:, None])
    return p, p * (_dot(do, v, (1, 1)) - delta[:, None])


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qm_refs, km_refs, span_refs, dq_ref, *,
               cfg: _Config):
    bk = cfg.block_k
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    qm = _meta_at(qm_refs, ...)

    def body(j, dq):
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k = k_ref[ks, :]
        _, ds = _tile_grads(q, k, v_ref[ks, :], do, lse, delta, allowed(qm, _meta_at(km_refs, ks)), cfg.scale)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(*_block_range(span_refs, bk), body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, km_refs, qm_refs, span_refs, dk_ref, dv_ref, *,
                cfg: _Config):
    bq = cfg.block_q
    k, v = k_ref[...], v_ref[...]
    km = _meta_at(km_refs, ...)

    def query_block(i, carry):
        qs = pl.ds(pl.multiple_of(i * bq, bq), bq)
        mask = allowed(_meta_at(qm_refs, qs), km)

        def head(g, carry):  # the G query heads of this KV head share the tile mask
            dk, dv = carry
            q, do = q_ref[qs, g, :], do_ref[qs, g, :]
            p, ds = _tile_grads(q, k, v, do, lse_ref[g, qs], delta_ref[g, qs], mask, cfg.scale)
            return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv + _dot(p.astype(do.dtype), do, (0, 0))

        return lax.fori_loop(0, cfg.group, head, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(*_block_range(span_refs, bq), query_block, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _call(kernel, cfg: _Config, grid, in_specs, out_specs, out_shape, name):
    d = out_shape[0].shape[-1]
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg), out_shape=out_shape, grid=grid, in_specs=in_specs,
        out_specs=out_specs, interpret=cfg.interpret, name=name,
        compiler_params=plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2))


def _meta_spec(block, index_map):
    return TokenMeta(*(pl.BlockSpec((block,), index_map),) * 4)


def _forward(q, k, v, q_meta, k_meta, q_span, cfg: _Config):
    tq, hq, d = q.shape
    tk = k.shape[0]
    bq, g = cfg.block_q, cfg.group
    per_q, whole_k = (lambda i, h: (i,)), (lambda i, h: (0,))
    out, lse = _call(
        _fwd_kernel, cfg, grid=(tq // bq, hq),
        in_specs=[pl.BlockSpec((bq, None, d), lambda i, h: (i, h, 0)),
                  pl.BlockSpec((tk, None, d), lambda i, h: (0, lax.div(h, g), 0)),
                  pl.BlockSpec((tk, None, d), lambda i, h: (0, lax.div(h, g), 0)),
                  _meta_spec(bq, per_q), _meta_spec(tk, whole_k), (pl.BlockSpec((bq,), per_q),) * 2],
        out_specs=[pl.BlockSpec((bq, None, d), lambda i, h: (i, h, 0)), pl.BlockSpec((None, bq), lambda i, h: (h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((hq, tq), jnp.float32)],
        name="packed_flash_fwd")(q, k, v, q_meta, k_meta, q_span)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_meta, k_meta, q_span, k_span, cfg: _Config):
    """Padded blocked attention: q (Tq, Hq, D), k/v (Tk, Hkv, D) with Tq % Bq == Tk % Bk == 0."""
    return _forward(q, k, v, q_meta, k_meta, q_span, cfg)[0]


def _flash_fwd(q, k, v, q_meta, k_meta, q_span, k_span, cfg):
    out, lse = _forward(q, k, v, q_meta, k_meta, q_span, cfg)
    return out, (q, k, v, q_meta, k_meta, q_span, k_span, out, lse)


def _flash_bwd(cfg: _Config, res, d_out):
    q, k, v, q_meta, k_meta, q_span, k_span, out, lse = res
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.group
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).T  # (Hq, Tq): rowsum(dO∘O)

    per_q, whole_k = (lambda i, h: (i,)), (lambda i, h: (0,))
    kv_whole = pl.BlockSpec((tk, None, d), lambda i, h: (0, lax.div(h, g), 0))
    q_tile = pl.BlockSpec((bq, None, d), lambda i, h: (i, h, 0))
    row_tile = pl.BlockSpec((None, bq), lambda i, h: (h, i))
    (dq,) = _call(
        _dq_kernel, cfg, grid=(tq // bq, hq),
        in_specs=[q_tile, kv_whole, kv_whole, q_tile, row_tile, row_tile, _meta_spec(bq, per_q),
                  _meta_spec(tk, whole_k), (pl.BlockSpec((bq,), per_q),) * 2],
        out_specs=[q_tile], out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
        name="packed_flash_dq")(q, k, v, d_out, lse, delta, q_meta, k_meta, q_span)

    per_k, whole_q = (lambda j, h: (j,)), (lambda j, h: (0,))
    kv_tile = pl.BlockSpec((bk, None, d), lambda j, h: (j, h, 0))
    q_group = pl.BlockSpec((tq, g, d), lambda j, h: (0, h, 0))  # the G query heads of KV head h
    rows_group = pl.BlockSpec((g, tq), lambda j, h: (h, 0))
    dk, dv = _call(
        _dkv_kernel, cfg, grid=(tk // bk, hkv),
        in_specs=[kv_tile, kv_tile, q_group, q_group, rows_group, rows_group, _meta_spec(bk, per_k),
                  _meta_spec(tq, whole_q), (pl.BlockSpec((bk,), per_k),) * 2],
        out_specs=[kv_tile, kv_tile], out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        name="packed_flash_dkv")(k, v, q, d_out, lse, delta, k_meta, q_meta, k_span)
    no_grad = jax.tree.map(lambda a: None, (q_meta, k_meta, q_span, k_span))
    return (dq, dk, dv) + no_grad


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_meta(meta: TokenMeta, length: int, pad_sample) -> TokenMeta:
    return pad_meta(jax.tree.map(lambda a: a.astype(jnp.int32), meta), length, sample=pad_sample)


def _query_spans(q_meta: TokenMeta, k_meta: TokenMeta, key_first, key_last):
    """Per key the inclusive (first, last) query that can see it: the hull of the queries whose key span covers it,
    tightened by `query_ranges` for self-attention (q_meta is k_meta: it also drops the tokens after a noised split,
    which the hull keeps)."""
    pos = jnp.arange(k_meta.length, dtype=jnp.int32)
    # Monotone envelopes: cummax(last) reaches k first at the first query whose span ends at or after k, and the
    # reverse cummin(first) stays <= k up to the last query whose span starts at or before k.
    first = jnp.searchsorted(lax.cummax(key_last), pos, side="left").astype(jnp.int32)
    last = jnp.searchsorted(lax.cummin(key_first, reverse=True), pos, side="right").astype(jnp.int32) - 1
    if q_meta is k_meta:
        self_first, self_last = query_ranges(k_meta)
        first, last = jnp.maximum(first, self_first), jnp.minimum(last, self_last)
    return first, last


# Rows × padded head dim of one tile, so that every kernel (the dK / dV one holds the most) fits an H100 / H200's
# 227 KiB of shared memory: at head dim 128, blocks of 512 (the TPU-sized block of configs/unimedvl_14b.py) asked
# the compiler for 648 KiB and blocks of 128 for 258 KiB (unimedvl-compile on 8xh200); blocks of 64 fit.
MAX_TILE = 64 * 128


def _pow2_block(block_size: int, length: int, head_dim: int) -> int:
    return min(block_size, max(16, MAX_TILE // head_dim), max(16, pl.next_power_of_2(length)))


def pallas_gpu_attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, scale: float, block_size: int,
                         interpret: bool | None = None):
    """Softmax attention of q (Tq, Hq, D) over k, v (Tk, Hkv, D) under the §4.3 mask, as a block-skipping GPU kernel."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of KV heads {hkv}")
    interpret = trace_platform() != "gpu" if interpret is None else bool(interpret)
    d_pad = max(16, pl.next_power_of_2(d))
    bq, bk = _pow2_block(block_size, tq, d_pad), _pow2_block(block_size, tk, d_pad)
    tq_pad, tk_pad = -(-tq // bq) * bq, -(-tk // bk) * bk

    key_first, key_last = key_ranges(q_meta, k_meta)
    query_first, query_last = _query_spans(q_meta, k_meta, key_first, key_last)
    # Padding tokens: sample ids below every real one, distinct for queries and keys (nothing sees them, they see
    # nothing); their spans are empty so they never widen a block's loop.
    floor = jnp.minimum(jnp.min(q_meta.sample), jnp.min(k_meta.sample)).astype(jnp.int32)
    q_meta_p, k_meta_p = _pad_meta(q_meta, tq_pad, floor - 1), _pad_meta(k_meta, tk_pad, floor - 2)
    q_span = (pad_tokens(key_first.astype(jnp.int32), tq_pad, FAR_INDEX),
              pad_tokens(key_last.astype(jnp.int32), tq_pad, -1))
    k_span = (pad_tokens(query_first, tk_pad, FAR_INDEX), pad_tokens(query_last, tk_pad, -1))

    def pad_x(x, length):
        x = pad_tokens(x, length, 0)
        return jnp.pad(x, ((0, 0), (0, 0), (0, d_pad - d))) if d_pad != d else x

    cfg = _Config(float(scale), bq, bk, hq // hkv, interpret)
    out = _flash(pad_x(q, tq_pad), pad_x(k, tk_pad), pad_x(v, tk_pad), q_meta_p, k_meta_p, q_span, k_span, cfg)
    return out[:tq, :, :d]
