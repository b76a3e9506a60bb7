"""Static-shape KV cache and context updates (docs/inference.md §5.1).

A context holds, per layer, K and V of every cached token *after* k-norm and RoPE, plus the tokens' attention metadata
(sample / split / mode / index) so new tokens attend under the same docs/packed_sequence.md §4.3 rules as in training.
Appending a chunk of n tokens writes the chunk's metadata and, layer by layer, its K/V into the cache at slots kv_len …
kv_len + n - 1 (in place when the cache is donated, as decoding does), then attends the chunk's queries over the whole
cache. Causality is bottom-right aligned as in flash-attn (docs/quirks.md §9.10): new token i sees the whole cache and
new tokens ≤ i. Slot s always holds sequence index s, each context is one sample and each chunk one split, so the
block-sparse backends visit only the key blocks up to the fill (docs/inference.md §5.1). Shapes are static: the cache
has `max_len` slots, chunks are padded to a bucket, so prefill compiles once per bucket and decoding compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from unimedvl_jax.models.attention import TokenMeta
from unimedvl_jax.packed_batch import CAUSAL, VAE

EMPTY_SAMPLE = -2   # cache slots not yet written: no query can see them
PAD_SAMPLE = -3     # padding inside an appended chunk (and its stale slots past the fill): no real query sees them


@struct.dataclass
class KVCache:
    """Per-layer keys/values (S, Hkv, D), their TokenMeta over S, the fill length and the next split id.

    keys / values are one stacked (L, S, Hkv, D) array (contexts) or a tuple of L per-layer arrays (the layered form
    decoding updates in place, `layered`). A batch of caches is the same pytree with a leading batch axis on every leaf.
    """

    keys: jax.Array | tuple
    values: jax.Array | tuple
    meta: TokenMeta
    length: jax.Array
    next_split: jax.Array

    @property
    def max_len(self) -> int:
        return jax.tree.leaves(self.keys)[0].shape[-3]


def _empty_meta(start: int, n: int) -> TokenMeta:
    """Metadata of n unwritten slots start … start + n - 1 (slot s holds index s)."""
    return TokenMeta(jnp.full((n,), EMPTY_SAMPLE, jnp.int32), jnp.full((n,), -1, jnp.int32),
                     jnp.full((n,), CAUSAL, jnp.int32), jnp.arange(start, start + n, dtype=jnp.int32))


def empty_cache(llm_cfg, max_len: int, dtype=jnp.float32) -> KVCache:
    """A cache with `max_len` empty slots (kv_len 0)."""
    head_dim = llm_cfg.hidden_size // llm_cfg.num_heads
    shape = (llm_cfg.num_layers, max_len, llm_cfg.num_kv_heads, head_dim)
    zero = jnp.zeros((), jnp.int32)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), _empty_meta(0, max_len), zero, zero)


def grow(cache: KVCache, extra: int) -> KVCache:
    """The cache (either form, any leading batch axes) with `extra` empty slots appended."""
    if extra == 0:
        return cache

    def pad(a):
        return jnp.concatenate([a, jnp.zeros(a.shape[:-3] + (extra,) + a.shape[-2:], a.dtype)], axis=-3)

    meta = jax.tree.map(lambda a, b: jnp.concatenate([a, jnp.broadcast_to(b, a.shape[:-1] + b.shape)], axis=-1),
                        cache.meta, _empty_meta(cache.max_len, extra))
    return cache.replace(keys=jax.tree.map(pad, cache.keys), values=jax.tree.map(pad, cache.values), meta=meta)


def layered(cache: KVCache) -> KVCache:
    """The cache with keys / values as tuples of per-layer arrays (the layer axis is the fourth from last)."""
    if isinstance(cache.keys, tuple):
        return cache
    return cache.replace(keys=tuple(jnp.unstack(cache.keys, axis=-4)),
                         values=tuple(jnp.unstack(cache.values, axis=-4)))


def bucket(n: int, minimum: int = 16) -> int:
    """Static chunk length for n tokens: the next power of two ≥ max(n, minimum)."""
    size = minimum
    while size < n:
        size *= 2
    return size


def expert_capacities(kinds) -> tuple[int, int]:
    """(und, gen) MoT expert capacities of a chunk, from its token kinds on the host: an expert no token uses gets
    none, so its projections are not computed at all (a text chunk or a decode step runs the und expert only)."""
    kinds = np.asarray(kinds)
    gen = int(np.count_nonzero(kinds == VAE))
    return kinds.shape[0] - gen, gen


def run_chunk(lm, cache: KVCache, embeds, kinds, positions, mode, n_valid, *, backend: str, block_size: int,
              advance_cache: bool = True, capacities: tuple[int, int] | None = None):
    """Run the language model `lm` on one chunk (n padded tokens, the first n_valid real) against the cache.

    kinds: token kinds (TEXT/VIT markers use the und expert, VAE latents the gen expert); positions: rope ids;
    mode: split mode of the chunk (one split). capacities: expert_capacities of the kinds when they are known on the
    host (None: n slots for each expert). Returns (new cache, in the form of `cache`, and the hidden states of the
    chunk after the final norms). With advance_cache=False the cache is returned unchanged (the `generate image`
    query, docs/inference.md §5.1) and the chunk is written into a copy with n more slots, so it never runs past the
    end.
    """
    n = embeds.shape[0]
    und_capacity, gen_capacity = (n, n) if capacities is None else capacities
    start = cache.length
    real = jnp.arange(n) < n_valid
    meta = TokenMeta(jnp.where(real, 0, PAD_SAMPLE).astype(jnp.int32), jnp.full((n,), cache.next_split, jnp.int32),
                     jnp.full((n,), mode, jnp.int32), (start + jnp.arange(n)).astype(jnp.int32))
    und = jnp.nonzero(real & (kinds != VAE), size=und_capacity, fill_value=n)[0].astype(jnp.int32)
    gen = jnp.nonzero(real & (kinds == VAE), size=gen_capacity, fill_value=n)[0].astype(jnp.int32)
    work = cache if advance_cache else grow(layered(cache), n)
    # Pad slots keep the chunk's split id, so the split stays one run (a later chunk overwrites them).
    slots = jax.tree.map(lambda old, new: jax.lax.dynamic_update_slice(old, new, (start,)), work.meta, meta)
    hidden, _, kvs = lm(embeds, positions, meta, [und, gen], backend=backend, block_size=block_size,
                        past=(work.keys, work.values, slots, start))
    if not advance_cache:
        return cache, hidden
    keys, values = tuple(k for k, _ in kvs), tuple(v for _, v in kvs)
    if not isinstance(cache.keys, tuple):
        keys, values = jnp.stack(keys), jnp.stack(values)
    return KVCache(keys, values, slots, cache.length + n_valid, cache.next_split + 1), hidden


def append_chunk(model, cache: KVCache, embeds, kinds, positions, mode, n_valid, *, advance_cache: bool = True):
    """run_chunk with the UniMedVL model's language model and attention settings (not jitted); kinds: a host array."""
    return run_chunk(model.language_model, cache, embeds, jnp.asarray(kinds), positions, mode, n_valid,
                     backend=model.cfg.attention_backend, block_size=model.cfg.attention_block_size,
                     advance_cache=advance_cache, capacities=expert_capacities(kinds))


@dataclasses.dataclass(frozen=True, eq=False)
class ModelStructure:
    """Hashable static handle on a module's graph and the model's attention settings (nnx's GraphDef holds an
    unhashable ConfigDict)."""

    graphdef: object
    treedef: object
    backend: str
    block_size: int

    def __hash__(self):
        return hash((self.treedef, self.backend, self.block_size))

    def __eq__(self, other):
        return self is other or (isinstance(other, ModelStructure) and self.treedef == other.treedef
                                 and (self.backend, self.block_size) == (other.backend, other.block_size)
                                 and self.graphdef == other.graphdef)

    def merge(self, params):
        """The module rebuilt from flat parameter arrays (inside a jitted function)."""
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, params))


_SPLITS = weakref.WeakKeyDictionary()  # module -> ({settings: ModelStructure}, (graphdef, treedef), Variables)


def split_model(model, module=None):
    """(ModelStructure, flat parameter arrays) of `module` (default: model.language_model), with the attention
    settings of model.cfg.

    Jitting over flat leaves avoids nnx.jit's per-call graph traversal, which costs more than a small chunk's whole
    forward; the traversal is done once per module, and the arrays are re-read from its Variables on every call, so
    parameter updates are seen (replacing a submodule or a Variable object is not).
    """
    module = model.language_model if module is None else module
    if module not in _SPLITS:
        graphdef, state = nnx.split(module)
        variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        treedef = jax.tree.structure(state)
        assert treedef.num_leaves == len(variables)
        _SPLITS[module] = ({}, (graphdef, treedef), variables)
    structures, (graphdef, treedef), variables = _SPLITS[module]
    settings = (model.cfg.attention_backend, model.cfg.attention_block_size)
    if settings not in structures:
        structures[settings] = ModelStructure(graphdef, treedef, *settings)
    return structures[settings], [v.get_value() for v in variables]


@functools.partial(jax.jit, static_argnums=0, static_argnames=("advance_cache", "capacities"))
def chunk_step(structure: ModelStructure, params, cache: KVCache, embeds, kinds, positions, mode, n_valid, *,
               advance_cache: bool = True, capacities: tuple[int, int] | None = None):
    """run_chunk on a split language model; compiles once per (chunk bucket, expert capacities, cache size,
    advance_cache)."""
    return run_chunk(structure.merge(params), cache, embeds, kinds, positions, mode, n_valid,
                     backend=structure.backend, block_size=structure.block_size, advance_cache=advance_cache,
                     capacities=capacities)


def append(model, cache: KVCache, embeds, kinds, positions, mode, n_valid, *, advance_cache: bool = True):
    """append_chunk, jitted (chunk_step over the model's cached split); kinds: a host array."""
    structure, params = split_model(model)
    return chunk_step(structure, params, cache, embeds, jnp.asarray(kinds), positions, mode, n_valid,
                      advance_cache=advance_cache, capacities=expert_capacities(kinds))
