"""Packed attention on TPU with the Pallas splash-attention kernel (docs/packed_sequence.md §4.3, §4.7).

Mask choice. The §4.3 mask (causal text, bidirectional image blocks, noised blocks hidden from other splits, samples
kept apart) depends on the pack, so splash's static mask objects (`CausalMask`, `NumpyMask`, ...), which are fixed
at trace time and shared by every batch, cannot express it; segment ids alone only express "same sample". We use
splash's dynamic-mask path instead: the (Tq, Tk) boolean `allowed(q_meta, k_meta)` is built inside the jitted step
and `make_splash_mha` turns it, in-graph, into block-sparse metadata: one entry per (query block, key block) saying
empty / partial / full, the index of the block's mask tile, and the key (or, for dK / dV, the query) block to fetch
next. The kernel skips every fully masked block: no MXU work, and its fetch index is pinned to block 0, so a run of
empty blocks triggers no new DMA. So the cost follows Σ sample_len² up to block rounding, like the `blocksparse`
backend; what remains for an empty block is the grid step itself, because the grid still spans every (head, query
block, key block).

Cost of the mask. The dynamic path hands each kernel the whole mask, tiled (`partial_mask_blocks`), and Pallas
passes boolean operands to a TPU kernel as int32: 4·Tq·Tk bytes per kernel and per pack, 256 MiB at 8K tokens and
4 GiB at 32K. The forward, dQ and dK / dV kernels each take one (dK / dV transposed); the mask has a single head
shared by all query heads. XLA fuses `allowed` straight into that int32 tiling, so no boolean copy lives on and the
backward recomputes its tilings from the small per-token metadata. Measured with the v5p ahead-of-time compile
(one pack per chip, 28 query / 4 KV heads, D = 128, bf16, block 512, forward + backward): 587 MiB of temporaries
at 8K tokens, 12.7 GiB at 32K, mostly these tilings. Building them is O(T²) work writing 12 bytes per score
(three kernels × 4 bytes) against 18·Hq·D FLOPs per score of the nine attention matmuls (Hq·D = 3584 in the 7B LLM):
at v5p's ≈ 6 bytes of HBM per 1000 FLOPs that is ≈ 3% of the time of unmasked attention, i.e. ≈ 3% / density for a
pack whose non-empty blocks are a fraction `density` of all blocks. The dQ kernel runs separately rather than fused
into the dK / dV kernel: the fused variant materialises a (Tk / block, Hq, Tq, D) partial-dQ buffer, larger than a
mask tiling by a factor Hq·D·2 / (4·block) (≈ 3.5 in bf16 at block 512).

Sharding. A Mosaic kernel cannot be partitioned automatically: under a jit whose packs are sharded, call this inside
`jax.shard_map(..., check_vma=False)` (the kernel's outputs carry no varying-axes annotation), e.g. per pack with
`in_specs=out_specs=P()` under `jax.vmap(..., spmd_axis_name=<batch mesh axes>)`, as the v5p compile test does.

Layout and numerics. q (Tq, Hq, D) and k / v (Tk, Hkv, D) are transposed to the kernel's head-major layout; GQA is
native (query head h reads KV head h // (Hq / Hkv)), no repeated KV heads. The scale is folded into q (the kernel has
no scale argument). Lengths are padded up to a whole number of blocks; padded keys are masked for every real query,
and padded queries see only the last key slot (so their rows stay finite) and are sliced off.

Block size. Both sequences use `block_size` tiles, clipped to the length rounded up to 128. The kernel works on
128-lane tiles, so the block size must be a multiple of 128 (also in interpret mode); 512 or 1024 suits v5p at 8K
tokens and more. Gradients come from splash's own custom VJP; `jax.vmap` over packs batches the kernel and its mask
metadata.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

from unimedvl_jax.models.attention_mask import TokenMeta, allowed
from unimedvl_jax.sharding import trace_platform

LANES = 128  # the kernel's tile granularity along both sequence axes


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _default_interpret() -> bool:
    backend = trace_platform()
    if backend == "cpu":
        return True
    if backend == "tpu":
        return False
    raise ValueError(f"splash attention is a TPU kernel; on {backend!r} use another backend or pass interpret=True")


def padded_mask(q_meta: TokenMeta, k_meta: TokenMeta, tq_pad: int, tk_pad: int):
    """The (tq_pad, tk_pad) §4.3 mask: padded keys invisible, padded queries see only the last key slot."""
    tq, tk = q_meta.length, k_meta.length
    mask = jnp.pad(allowed(q_meta, k_meta), ((0, tq_pad - tq), (0, tk_pad - tk)))
    pad_query = jnp.arange(tq_pad) >= tq
    last_key = jnp.arange(tk_pad) == tk_pad - 1
    return mask | (pad_query[:, None] & last_key[None, :])


def _kernel(mask, block_q: int, block_kv: int, interpret: bool):
    """Splash kernel for one pack's dynamic (Tq, Tk) mask, with separate dQ and dK / dV backward kernels."""
    sizes = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                              block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                              block_q_dq=block_q, block_kv_dq=block_kv, use_fused_bwd_kernel=False)
    kernel = splash.make_splash_mha(mask[None], block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    # make_splash_mha stores `is_dynamic_mask` as an array, a tracer under jit, which the kernel's Python `if` on it
    # cannot read; put the plain bool back.
    infos = [None if info is None else info._replace(is_dynamic_mask=True)
             for info in (kernel.fwd_mask_info, kernel.dq_mask_info, kernel.dkv_mask_info)]
    return splash.SplashAttentionKernel(*infos, **kernel.kwargs)


def splash_attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, scale: float | None = None,
                     block_size: int = 512, interpret: bool | None = None):
    """Softmax attention of q (Tq, Hq, D) over k, v (Tk, Hkv, D) under the §4.3 mask with the splash TPU kernel."""
    if q.ndim != 3 or k.ndim != 3 or v.shape != k.shape:
        raise ValueError(f"expected q (Tq, Hq, D) and k, v (Tk, Hkv, D) of one shape; got q {q.shape}, k {k.shape}, "
                         f"v {v.shape}")
    (tq, hq, d), (tk, hkv, dk) = q.shape, k.shape
    if dk != d:
        raise ValueError(f"q head dim {d} != k head dim {dk} (q {q.shape}, k {k.shape})")
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of KV heads {hkv} (q {q.shape}, k {k.shape})")
    if q_meta.length != tq or k_meta.length != tk:
        raise ValueError(f"metadata lengths (q {q_meta.length}, k {k_meta.length}) do not match q {q.shape}, "
                         f"k {k.shape}")
    if block_size <= 0 or block_size % LANES:
        raise ValueError(f"splash block_size must be a positive multiple of {LANES}, got {block_size}")
    interpret = _default_interpret() if interpret is None else interpret
    scale = d**-0.5 if scale is None else scale

    block_q, block_kv = min(block_size, _round_up(tq, LANES)), min(block_size, _round_up(tk, LANES))
    tq_pad, tk_pad = _round_up(tq, block_q), _round_up(tk, block_kv)
    kernel = _kernel(padded_mask(q_meta, k_meta, tq_pad, tk_pad), block_q, block_kv, interpret)

    def heads_major(x, length):
        return jnp.pad(x, ((0, length - x.shape[0]), (0, 0), (0, 0))).transpose(1, 0, 2)

    out = kernel(heads_major((q * scale).astype(q.dtype), tq_pad), heads_major(k, tk_pad), heads_major(v, tk_pad))
    return out.transpose(1, 0, 2)[:tq].astype(q.dtype)
