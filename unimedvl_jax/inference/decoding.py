"""Batched KV-cache text decoding (docs/inference.md §5.2) over contexts of different lengths.

Each row keeps its own cache, kv_len and rope; the rows' caches are stacked on a leading batch axis, in the layered
form (one buffer per layer), and one jitted step advances every row by one token (the single-context cache append,
vmapped): the step donates the cache, so each layer's new K/V is written in place. Shapes depend only on
(batch, max_len), never on the token index or the prompt lengths, so the step compiles once per cache shape.
The block-sparse backends and `cpu_ffi` visit only the keys up to each row's fill, so a step's cost follows the context
length; `dense` attends over all max_len slots (empty ones masked) (docs/inference.md §5.2).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unimedvl_jax.inference.kv_cache import (
    KVCache,
    ModelStructure,
    expert_capacities,
    grow,
    layered,
    run_chunk,
    split_model,
)
from unimedvl_jax.inference.row_sharding import RowSharding
from unimedvl_jax.inference.sampling import check_sampling, sample_token
from unimedvl_jax.models.attention import resolve_backend
from unimedvl_jax.packed_batch import CAUSAL, TEXT


def min_rows(backend: str) -> int:
    """The fewest rows a decode step runs with the attention backend: 2, except for the dense reference."""
    # With one row XLA turns the vmapped cache write into a dynamic-update-slice that it fuses into each reader (the
    # block-sparse loop's blocked view, the returned cache), each writing into its own copy of the whole cache.
    # Dense attention transposes every row's whole cache, so it runs fastest with one row.
    return 1 if resolve_backend(backend) == "dense" else 2


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def decode_step(structure: ModelStructure, params, cache: KVCache, tokens, positions, active, key, step, temperature,
                top_p):
    """Feed tokens (B,) at positions (B,) to a batched layered cache (donated: each layer is updated in place); rows
    with active=False keep their length (their token is written as an invisible padding slot past it).

    Returns (cache, logits (B, V) fp32, next tokens (B,)); row r samples with fold_in(fold_in(key, r), step).
    """
    lm = structure.merge(params)

    kinds = np.full(1, TEXT, np.int32)  # on the host, so the chunk's expert capacities are static

    def row(cache, token, position, is_active):
        cache, hidden = run_chunk(lm, cache, lm.embed(token[None]), jnp.asarray(kinds), position[None], CAUSAL,
                                  is_active.astype(jnp.int32), backend=structure.backend,
                                  block_size=structure.block_size, capacities=expert_capacities(kinds))
        return cache, lm.logits(hidden[0])

    cache, logits = jax.vmap(row)(cache, tokens, positions, active)
    row_keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), step))(jnp.arange(tokens.shape[0]))
    sample = jax.vmap(sample_token, in_axes=(0, 0, None, None))
    # Greedy skips the sampler's vocabulary sorts (sample_token also returns the argmax at temperature 0).
    chosen = jax.lax.cond(temperature > 0, lambda: sample(logits, row_keys, temperature, top_p),
                          lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return cache, logits, chosen


def stack_rows(caches, row_sharding: RowSharding | None = None, *, block_size: int = 1) -> KVCache:
    """Contexts' caches stacked on a leading row axis (split over the row sharding's devices), in the layered form
    decode_step takes: a fresh copy, so the contexts keep their own caches.

    A cache longer than `block_size` gets empty slots up to a multiple of it, so that the block-sparse backends need
    not pad the keys (a copy of every layer) at each step.
    """
    caches = list(caches)
    size = caches[0].max_len
    if size > block_size:
        caches = [grow(c, -size % block_size) for c in caches]
    if row_sharding is None:
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *caches)
    else:
        stacked = row_sharding.stack(caches)
    return layered(stacked)


@dataclasses.dataclass
class Decoded:
    """Per row: token ids starting with <|im_start|> (the stop token excluded) and, if asked, step logits."""

    ids: list[list[int]]
    logits: list[np.ndarray] | None


def decode(contexts: Sequence, max_length: int, *, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
           return_logits: bool = False, rows: int | None = None, row_sharding: RowSharding | None = None) -> Decoded:
    """docs/inference.md §5.2 for each context (same model and cache size): feed <|im_start|>, then chosen tokens, until
    a row's newly predicted token is <|im_end|> (not kept) or it has run max_length steps (the start token is step 1).

    The contexts are not modified. Sampling is deterministic given the seed and the row's index in the batch.
    rows: decode this many rows (≥ len(contexts), at least min_rows); the extra rows are inactive copies of the first
    context, so a short last batch reuses the compiled step. row_sharding: split the rows over its devices (the row
    count must split evenly; the contexts were built on its models) and decode with its replicated model.
    """
    if not contexts:
        raise ValueError("decode needs at least one context")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1 (the start token is step 1), got {max_length}")
    check_sampling(temperature, top_p)
    batch = len(contexts)
    rows = batch if rows is None else rows
    if rows < batch:
        raise ValueError(f"rows={rows} is fewer than the {batch} contexts")
    max_len = contexts[0].cache.max_len
    models = (contexts[0].model,) if row_sharding is None else (row_sharding.model, *row_sharding.device_models)
    for i, ctx in enumerate(contexts):
        if not any(ctx.model is m for m in models) or ctx.cache.max_len != max_len:
            raise ValueError(f"context {i}: all contexts must share one model and one cache size ({max_len})"
                             + ("" if row_sharding is None else " (built on the row sharding's models)"))
        if ctx.kv_len + max_length > max_len:
            raise ValueError(f"context {i}: {ctx.kv_len} cached + {max_length} generated tokens > max_len "
                             f"{max_len}")
    model = models[0]
    st = model.cfg.special_tokens
    rows = max(rows, min_rows(model.cfg.attention_backend))
    padded = list(contexts) + [contexts[0]] * (rows - batch)
    cache = stack_rows((ctx.cache for ctx in padded), row_sharding, block_size=model.cfg.attention_block_size)
    ropes = np.asarray([ctx.rope for ctx in padded], np.int32)
    tokens = np.full(rows, st.bos_token_id, np.int32)
    active = np.arange(rows) < batch
    ids = [[st.bos_token_id] for _ in range(batch)]
    logits = [[] for _ in range(batch)]
    key = jax.random.key(seed)
    structure, params = split_model(model)
    for step in range(max_length):
        cache, step_logits, chosen = decode_step(structure, params, cache, tokens, ropes + step, active, key,
                                                 np.int32(step), np.float32(temperature), np.float32(top_p))
        if return_logits:
            host_logits = np.asarray(step_logits)
            for r in np.flatnonzero(active):
                logits[r].append(host_logits[r])
        if step == max_length - 1:
            break
        chosen = np.asarray(chosen)
        stopped = active & (chosen == st.eos_token_id)
        for r in np.flatnonzero(active & ~stopped):
            ids[r].append(int(chosen[r]))
        active &= ~stopped
        if not active.any():
            break
        tokens = chosen
    return Decoded(ids, [np.stack(steps) for steps in logits] if return_logits else None)
