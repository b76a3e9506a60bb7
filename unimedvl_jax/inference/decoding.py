"""Batched KV-cache text decoding (docs/inference.md §5.2) over contexts of different lengths.

Each row keeps its own cache, kv_len and rope; the rows' caches are stacked on a leading batch axis and one
jitted step advances every row by one token (the single-context cache append, vmapped). Shapes depend only on
(batch, max_len), never on the token index or the prompt lengths, so the step compiles once per cache shape.
Decoding attends over all max_len slots (empty ones masked), so a step costs the same at any context length.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimedvl_jax.inference.kv_cache import append_chunk
from unimedvl_jax.inference.row_sharding import RowSharding
from unimedvl_jax.inference.sampling import check_sampling, sample_token
from unimedvl_jax.packed_batch import CAUSAL, TEXT


@dataclasses.dataclass(frozen=True, eq=False)
class ModelStructure:
    """Hashable static handle on a model's graph (nnx's GraphDef holds an unhashable ConfigDict)."""

    graphdef: object
    treedef: object

    def __hash__(self):
        return hash(self.treedef)

    def __eq__(self, other):
        return self is other or (isinstance(other, ModelStructure) and self.treedef == other.treedef
                                 and self.graphdef == other.graphdef)


def split_model(model):
    """(ModelStructure, flat list of state arrays): jitting over flat leaves avoids nnx.jit's per-call graph
    traversal, which costs more than a tiny model's whole decode step."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    return ModelStructure(graphdef, treedef), leaves


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def decode_step(structure: ModelStructure, params, cache, tokens, positions, active, key, step, temperature,
                top_p):
    """Feed tokens (B,) at positions (B,) to a batched cache; rows with active=False keep their length (their
    token is written as an invisible empty slot past it).

    Returns (cache, logits (B, V) fp32, next tokens (B,)); row r samples with fold_in(fold_in(key, r), step).
    """
    model = nnx.merge(structure.graphdef, jax.tree.unflatten(structure.treedef, params))

    def row(cache, token, position, is_active, row_key):
        embed = model.language_model.embed(token[None])
        cache, hidden = append_chunk(model, cache, embed, jnp.full((1,), TEXT, jnp.int32), position[None],
                                     CAUSAL, is_active.astype(jnp.int32))
        logits = model.language_model.logits(hidden[0])
        return cache, logits, sample_token(logits, jax.random.fold_in(row_key, step), temperature, top_p)

    row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(tokens.shape[0]))
    return jax.vmap(row)(cache, tokens, positions, active, row_keys)


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
    rows: decode this many rows (≥ len(contexts)); the extra rows are inactive copies of the first context, so a
    short last batch reuses the compiled step. row_sharding: split the rows over its devices (the row count must
    split evenly; the contexts were built on its models) and decode with its replicated model.
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
    padded = list(contexts) + [contexts[0]] * (rows - batch)
    # A fresh stacked copy: the step donates it, the contexts keep their own caches.
    if row_sharding is None:
        cache = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(ctx.cache for ctx in padded))
    else:
        cache = row_sharding.stack(ctx.cache for ctx in padded)
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
