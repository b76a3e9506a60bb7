"""Packed attention over the UniMedVL mask (docs/packed_sequence.md §4.3) and the choice of backend (§4.7).

`dense` is the reference (a full Tq × Tk score array); `chunked` is flash-style online softmax over every key block
(memory-bounded, any metadata); `blocksparse` (attention_blocksparse.py, the CPU default), `splash` (TPU,
attention_splash.py) and `pallas_gpu` (attention_pallas_gpu.py) visit only the blocks the mask can reach, so their
cost follows Σ sample_len². `auto` picks the platform's fast backend. The mask is never stored as data: every backend
recomputes it from per-token metadata (sample id, split id, split mode, index).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from unimedvl_jax.config import ATTENTION_BACKENDS
from unimedvl_jax.models import attention_cpu_ffi
from unimedvl_jax.models.attention_blocksparse import blocksparse_attention
from unimedvl_jax.models.attention_mask import MASKED as _MASKED
from unimedvl_jax.models.attention_mask import TokenMeta, allowed, pad_meta, pad_tokens, segment_meta  # noqa: F401
from unimedvl_jax.models.attention_pallas_gpu import pallas_gpu_attention
from unimedvl_jax.models.attention_splash import splash_attention
from unimedvl_jax.sharding import trace_platform

PLATFORM_BACKENDS = {"tpu": "splash", "gpu": "pallas_gpu"}


def resolve_backend(backend: str) -> str:
    """The concrete backend for 'auto' on the platform being traced for (sharding.trace_platform: the mesh's devices,
    else the default JAX platform; docs/packed_sequence.md §4.7); others unchanged."""
    if backend != "auto":
        return backend
    platform = trace_platform()
    if platform in PLATFORM_BACKENDS:
        return PLATFORM_BACKENDS[platform]
    return "cpu_ffi" if attention_cpu_ffi.available() else "blocksparse"


def _per_device(kernel):
    """A Pallas kernel call made per device: under a multi-device mesh context (the train step traces inside
    `jax.sharding.use_abstract_mesh`) XLA cannot partition a kernel, so it runs in `jax.shard_map` on whole per-pack
    operands; the pack axis is split over devices by the enclosing `vmap(..., spmd_axis_name=batch axes)`
    (docs/packed_sequence.md §4.7)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel
    return jax.shard_map(kernel, in_specs=PartitionSpec(), out_specs=PartitionSpec(), check_vma=False)


def _group_queries(q, num_kv_heads):
    """(T, Hq, D) -> (T, Hkv, G, D): query head h uses KV head h // G (docs/model.md §3.3)."""
    t, hq, d = q.shape
    return q.reshape(t, num_kv_heads, hq // num_kv_heads, d)


def _dense(q, k, v, q_meta, k_meta, scale):
    qg = _group_queries(q, k.shape[1])
    scores = jnp.einsum("qhgd,khd->hgqk", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(allowed(q_meta, k_meta)[None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("hgqk,khd->qhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(q.shape).astype(q.dtype)


def _chunked(q, k, v, q_meta, k_meta, scale, block_size):
    """Flash-style online softmax over key blocks, one query block at a time (no Tq × Tk buffer)."""
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    g = hq // hkv
    nq, nk = -(-tq // block_size), -(-tk // block_size)
    qp = pad_tokens(_group_queries(q, hkv), nq * block_size, 0).reshape(nq, block_size, hkv, g, d)
    kp = pad_tokens(k, nk * block_size, 0).reshape(nk, block_size, hkv, d)
    vp = pad_tokens(v, nk * block_size, 0).reshape(nk, block_size, hkv, d)
    qm = jax.tree.map(lambda a: a.reshape(nq, block_size), pad_meta(q_meta, nq * block_size, sample=-2, split=-2))
    km = jax.tree.map(lambda a: a.reshape(nk, block_size), pad_meta(k_meta, nk * block_size, sample=-2, split=-2))

    @jax.checkpoint
    def query_block(q_blk, q_blk_meta):
        def key_step(carry, xs):
            m, l, acc = carry
            k_blk, v_blk, k_blk_meta = xs
            s = jnp.einsum("qhgd,khd->hgqk", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
            s = jnp.where(allowed(q_blk_meta, k_blk_meta)[None, None], s, _MASKED)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            l_new = l * correction + p.sum(axis=-1)
            pv = jnp.einsum("hgqk,khd->hgqd", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
            return (m_new, l_new, acc * correction[..., None] + pv), None

        init = (jnp.full((hkv, g, block_size), _MASKED, jnp.float32),
                jnp.zeros((hkv, g, block_size), jnp.float32),
                jnp.zeros((hkv, g, block_size, d), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(key_step, init, (kp, vp, km))
        out = acc / l[..., None]
        return jnp.transpose(out, (2, 0, 1, 3))  # (block, hkv, g, d)

    out = jax.lax.map(lambda xs: query_block(*xs), (qp, qm))
    return out.reshape(nq * block_size, hq, d)[:tq].astype(q.dtype)


def packed_attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, backend: str = "auto",
                     block_size: int = 128, scale: float | None = None):
    """Softmax attention of q (Tq, Hq, D) over k, v (Tk, Hkv, D) under the docs/packed_sequence.md §4.3 mask; GQA by
    head grouping."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of KV heads {k.shape[1]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    backend = resolve_backend(backend)
    if backend == "dense":
        return _dense(q, k, v, q_meta, k_meta, scale)
    if backend == "chunked":
        return _chunked(q, k, v, q_meta, k_meta, scale, block_size)
    if backend == "blocksparse":
        return blocksparse_attention(q, k, v, q_meta, k_meta, scale=scale, block_size=block_size)
    if backend == "cpu_ffi":
        return _per_device(functools.partial(attention_cpu_ffi.cpu_ffi_attention, scale=scale))(
            q, k, v, q_meta, k_meta)
    if backend == "splash":  # TPU tiles: a multiple of 128
        return _per_device(functools.partial(splash_attention, scale=scale, block_size=-(-block_size // 128) * 128))(
            q, k, v, q_meta, k_meta)
    if backend == "pallas_gpu":  # Triton tiles: a power of two >= 16
        return _per_device(functools.partial(pallas_gpu_attention, scale=scale,
                                             block_size=max(16, 1 << (block_size - 1).bit_length())))(
            q, k, v, q_meta, k_meta)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")

