"""The in-place KV cache (docs/inference.md §5.1, §5.2) for the dense reference and the block-sparse backend: greedy
decoding equals a full forward without a cache token for token (logits within 1e-5), batched rows equal rows decoded
alone, the image query (advance_cache=False) leaves the cache unchanged, the cache metadata keeps the block-sparse
layout (slot s holds index s, the context one run), and the decode step updates the donated cache without copying it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimedvl_jax.inference import kv_cache
from unimedvl_jax.inference.context import Context
from unimedvl_jax.inference.decoding import decode, decode_step, stack_rows
from unimedvl_jax.models.attention import TokenMeta
from unimedvl_jax.models.unimedvl import UniMedVL
from unimedvl_jax.packed_batch import CAUSAL, FULL, TEXT, VAE
from unimedvl_jax.testing import small_model_config

BACKENDS = ["dense", "blocksparse"]
BLOCK = 16  # small blocks, so that prompts and decoding span several key blocks
MAX_LEN = 72  # not a multiple of BLOCK: decoding pads it (stack_rows)
REF_LEN = 64  # the reference forward's static length
STEPS = 8
PROMPTS = [[list(range(3, 8))], [list(range(10, 30)), list(range(40, 47))], [list(range(50, 81))]]


def make_model(backend):
    cfg = small_model_config()
    cfg.attention_backend, cfg.attention_block_size = backend, BLOCK
    return UniMedVL(cfg, rngs=nnx.Rngs(0))  # the same weights for every backend


@pytest.fixture(scope="module", params=BACKENDS)
def model(request):
    return make_model(request.param)


def prefill(model, segments, max_len=MAX_LEN):
    ctx = Context.new(model, max_len)
    for ids in segments:
        ctx = ctx.add_text(ids)
    return ctx


@nnx.jit
def _last_logits(lm, tokens, split, length):
    n = tokens.shape[0]
    real = jnp.arange(n) < length
    meta = TokenMeta(jnp.where(real, 0, -1), split, jnp.full((n,), CAUSAL, jnp.int32), jnp.arange(n, dtype=jnp.int32))
    hidden, _, _ = lm(lm.embed(tokens), jnp.arange(n, dtype=jnp.int32), meta,
                      [jnp.arange(n, dtype=jnp.int32), jnp.full((n,), n, jnp.int32)], backend="dense")
    return lm.logits(hidden[length - 1])


def full_forward_logits(model, segments, answer):
    """Logits after the last token of the text segments + [<|im_start|>] + answer, from one dense forward of the whole
    sequence (no cache): every segment its own causal split, positions 0 … T-1."""
    st = model.cfg.special_tokens
    tokens, split = [], []
    for i, ids in enumerate([*segments, None]):
        seg = [st.bos_token_id, *answer] if ids is None else [st.bos_token_id, *ids, st.eos_token_id]
        tokens += seg
        split += [i] * len(seg)
    length = len(tokens)
    pad = REF_LEN - length
    return np.asarray(_last_logits(model.language_model, jnp.asarray(tokens + [0] * pad, jnp.int32),
                                   jnp.asarray(split + [-1] * pad, jnp.int32), length))


def test_greedy_decoding_equals_full_recompute(model):
    for segments in PROMPTS:
        out = decode([prefill(model, segments)], STEPS, return_logits=True)
        ids, logits = out.ids[0], out.logits[0]
        assert len(ids) == STEPS == len(logits)
        for step in range(STEPS):
            want = full_forward_logits(model, segments, ids[1:step + 1])
            np.testing.assert_allclose(logits[step], want, rtol=0, atol=1e-5)
            if step + 1 < STEPS:
                assert ids[step + 1] == int(np.argmax(want))


def test_backends_agree_token_for_token():
    dense, sparse = make_model("dense"), make_model("blocksparse")
    for segments in PROMPTS:
        a = decode([prefill(dense, segments)], STEPS, return_logits=True)
        b = decode([prefill(sparse, segments)], STEPS, return_logits=True)
        assert a.ids == b.ids
        np.testing.assert_allclose(a.logits[0], b.logits[0], rtol=0, atol=1e-5)


def test_batched_rows_equal_rows_alone(model):
    contexts = [prefill(model, segments) for segments in PROMPTS]
    assert len({ctx.kv_len for ctx in contexts}) == len(contexts)
    batched = decode(contexts, STEPS, return_logits=True, rows=4)  # one inactive padding row
    for i, ctx in enumerate(contexts):
        alone = decode([ctx], STEPS, return_logits=True)
        assert batched.ids[i] == alone.ids[0]
        np.testing.assert_allclose(batched.logits[i], alone.logits[0], rtol=0, atol=1e-5)


def _leaves(cache):
    return [np.asarray(a) for a in jax.tree.leaves(cache)]


def test_image_query_leaves_the_cache_unchanged(model):
    """advance_cache=False returns the cache untouched, also when the query runs past its end (42 cached + 30 > 64),
    and its hidden states equal those of the same chunk appended to a roomy cache."""
    tight, roomy = prefill(model, [list(range(40))], 64), prefill(model, [list(range(40))], 128)
    n = 30
    embeds = jax.random.normal(jax.random.key(0), (n, model.cfg.llm.hidden_size))
    kinds = jnp.asarray([TEXT] + [VAE] * (n - 2) + [TEXT], jnp.int32)
    positions = jnp.full((n,), tight.rope, jnp.int32)
    before = _leaves(tight.cache)
    cache, hidden = kv_cache.append(model, tight.cache, embeds, kinds, positions, jnp.int32(FULL), jnp.int32(n),
                                    advance_cache=False)
    assert all(np.array_equal(a, b) for a, b in zip(before, _leaves(cache)))
    assert all(np.array_equal(a, b) for a, b in zip(before, _leaves(tight.cache)))
    advanced, want = kv_cache.append(model, roomy.cache, embeds, kinds, positions, jnp.int32(FULL), jnp.int32(n))
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(want), rtol=0, atol=1e-5)
    assert int(advanced.length) == roomy.kv_len + n


def test_cache_layout_is_block_sparse_ready(model):
    """Slot s holds index s; the context's tokens are the one run of sample 0 at slots 0 … kv_len-1, each segment one
    split run; the padding of a chunk past the fill is invisible (PAD_SAMPLE) and keeps the chunk's split."""
    ctx = prefill(model, PROMPTS[1])
    meta = jax.tree.map(np.asarray, ctx.cache.meta)
    np.testing.assert_array_equal(meta.index, np.arange(MAX_LEN))
    np.testing.assert_array_equal(meta.sample[:ctx.kv_len], 0)
    assert not (meta.sample[ctx.kv_len:] == 0).any()
    first, second = len(PROMPTS[1][0]) + 2, len(PROMPTS[1][1]) + 2
    np.testing.assert_array_equal(meta.split[:ctx.kv_len], [0] * first + [1] * second)
    pad_end = first + kv_cache.bucket(second)
    np.testing.assert_array_equal(meta.sample[ctx.kv_len:pad_end], kv_cache.PAD_SAMPLE)
    np.testing.assert_array_equal(meta.split[ctx.kv_len:pad_end], 1)
    np.testing.assert_array_equal(meta.sample[pad_end:], kv_cache.EMPTY_SAMPLE)


def test_decode_step_updates_the_cache_in_place(model):
    """The donated cache is aliased to the step's output; with the block-sparse backend the step also needs no
    temporary buffer the size of a layer (no copy of the cache)."""
    ctx = prefill(model, PROMPTS[0], 4096)
    structure, params = kv_cache.split_model(model)
    rows = 2
    cache = stack_rows([ctx.cache] * rows, block_size=BLOCK)
    stats = decode_step.lower(structure, params, cache, np.zeros(rows, np.int32), np.zeros(rows, np.int32),
                              np.ones(rows, bool), jax.random.key(0), np.int32(0), np.float32(0),
                              np.float32(1)).compile().memory_analysis()
    layer = cache.keys[0].nbytes
    assert stats.alias_size_in_bytes >= 2 * len(cache.keys) * layer
    if model.cfg.attention_backend == "blocksparse":
        assert stats.temp_size_in_bytes < layer / 4, (stats.temp_size_in_bytes, layer)


def test_chunks_run_only_the_experts_their_tokens_use(model):
    """expert_capacities sizes each MoT expert to the chunk's tokens: a text chunk skips the gen expert, an image
    chunk runs the und expert on its markers and padding only; the hidden states equal those of n slots per expert,
    and both compile to fewer FLOPs."""
    ctx = prefill(model, [list(range(20))])
    structure, params = kv_cache.split_model(model)
    n = 24
    embeds = jax.random.normal(jax.random.key(1), (n, model.cfg.llm.hidden_size))
    positions = jnp.full((n,), ctx.rope, jnp.int32)
    text = np.full(n, TEXT, np.int32)
    image = np.asarray([TEXT] + [VAE] * (n - 4) + [TEXT] * 3, np.int32)  # the last two are chunk padding
    assert kv_cache.expert_capacities(text) == (n, 0)
    assert kv_cache.expert_capacities(image) == (4, n - 4)
    flops = {}
    for name, kinds, mode in (("text", text, CAUSAL), ("image", image, FULL)):
        args = (structure, params, ctx.cache, embeds, jnp.asarray(kinds), positions, jnp.int32(mode), jnp.int32(n - 2))
        sized = kv_cache.expert_capacities(kinds)
        (_, want), (_, got) = (kv_cache.chunk_step(*args, capacities=c) for c in (None, sized))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5, err_msg=name)
        flops[name] = [kv_cache.chunk_step.lower(*args, capacities=c).compile().cost_analysis()["flops"]
                       for c in (None, sized)]
    assert all(sized < 0.75 * full for full, sized in flops.values()), flops
