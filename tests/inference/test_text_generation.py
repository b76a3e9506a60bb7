"""Batched KV-cache text generation (docs/inference.md §5.2) against greedy decoding by full recompute, the top-p rule
against a NumPy reference, seeding, compile counts and the stop rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimedvl_jax.inference import decoding, kv_cache
from unimedvl_jax.inference.context import Context
from unimedvl_jax.inference.sampling import sample_token, top_p_mask
from unimedvl_jax.inference.text_generation import ImageSegment, TextSegment, generate, prefill, prompt_length
from unimedvl_jax.models.unimedvl import UniMedVL
from unimedvl_jax.patches import patchify
from unimedvl_jax.testing import Text, VitImage, build_packed_batch, small_model_config

CFG = small_model_config()
EOS = CFG.special_tokens.eos_token_id
MAX_NEW = 7
REF_STATIC = dict(pad_to=40, capacities=dict(und=40, gen=4, ce=16, vit=16, vae=4, vae_images=1))


@pytest.fixture(scope="module")
def model():
    return UniMedVL(CFG, rngs=nnx.Rngs(0))


def make_prompts(rng):
    """Four prompts: (cached-path segments, packed-batch items) with ViT images of different sizes."""
    patch = CFG.vit.patch_size

    def text(n):
        ids = rng.integers(0, 250, n).tolist()
        return TextSegment(ids), Text(ids)

    def image(h, w):
        pixels = rng.uniform(-1, 1, (h * patch, w * patch, 3)).astype(np.float32)
        return ImageSegment(patchify(pixels, patch), (h, w)), VitImage((h, w), pixels=pixels)

    layouts = [[image(2, 3), text(5)], [text(12)], [image(3, 2), image(1, 4), text(2)],
               [text(3), image(2, 2), text(7)]]
    return [[seg for seg, _ in p] for p in layouts], [[item for _, item in p] for p in layouts]


@nnx.jit
def _ce_logits(model, batch, latents, noise):
    return model(batch, latents, noise).ce_logits


def greedy_by_recompute(model, items, max_new):
    """docs/inference.md §5.2 greedy without a cache: each step runs prompt + [<|im_start|>, generated...] through the
    packed training forward and takes the argmax at the last position."""
    generated = []
    for _ in range(max_new):
        # The open answer segment is built as a closed text; its trailing <|im_end|> cannot affect earlier
        # positions under the causal mask.
        batch, latents, noise = build_packed_batch([items + [Text(generated, loss=True)]], CFG, **REF_STATIC)
        token = int(np.argmax(_ce_logits(model, batch, latents, noise)[len(generated)]))
        if token == EOS:
            break
        generated.append(token)
    return generated


def test_batched_greedy_equals_full_recompute(model):
    prompts, items = make_prompts(np.random.default_rng(0))
    assert len({prompt_length(p) for p in prompts}) == len(prompts)
    got = generate(model, prompts, MAX_NEW)
    assert got == [greedy_by_recompute(model, it, MAX_NEW) for it in items]
    # Rows are independent of each other's place in the batch.
    assert generate(model, prompts[::-1], MAX_NEW) == got[::-1]


def nucleus_reference(logits, p):
    """NumPy top-p: the smallest prefix of the probability-sorted tokens whose mass reaches p."""
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(logits[order] - logits.max())
    probs /= probs.sum()
    k = int(np.searchsorted(np.cumsum(probs), p)) + 1
    keep = np.zeros(logits.shape, bool)
    keep[order[:k]] = True
    return keep


def test_top_p_mask_matches_numpy_reference():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (20, 64))
    for p in (1e-6, 0.1, 0.5, 0.9, 0.999):
        got = np.asarray(top_p_mask(jnp.asarray(logits, jnp.float32), p))
        want = np.stack([nucleus_reference(row, p) for row in logits])
        assert np.array_equal(got, want), p
    assert np.asarray(top_p_mask(jnp.asarray(logits, jnp.float32), 1.0)).all()


def test_samples_stay_in_the_nucleus_and_tiny_p_is_greedy():
    logits = jnp.asarray(np.random.default_rng(2).normal(0, 2, 32), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 200)
    draw = jax.vmap(sample_token, in_axes=(None, 0, None, None))
    kept = np.flatnonzero(np.asarray(top_p_mask(logits, 0.6)))
    samples = np.asarray(draw(logits, keys, 1.0, 0.6))
    assert set(samples) <= set(kept) and len(set(samples)) > 1
    assert np.all(np.asarray(draw(logits, keys, 1.0, 1e-6)) == int(jnp.argmax(logits)))


def test_tiny_top_p_generates_the_greedy_tokens(model):
    prompts, _ = make_prompts(np.random.default_rng(0))
    assert generate(model, prompts, 4, temperature=1.0, top_p=1e-6, seed=3) == generate(model, prompts, 4)


def test_seeds_on_flat_logits(model):
    """With a zero lm_head every token is equally likely, so two seeds agreeing would be a 256^-15 event."""
    flat = nnx.clone(model)
    flat.language_model.lm_head.kernel[...] = jnp.zeros_like(flat.language_model.lm_head.kernel[...])
    prompts = [[TextSegment([1, 2, 3])], [TextSegment([4])], [TextSegment([5, 6])], [TextSegment([7])]]
    run = lambda seed: generate(flat, prompts, 5, temperature=1.0, seed=seed)  # noqa: E731
    assert run(0) == run(0)
    assert run(0) != run(1)
    assert len({tuple(row) for row in run(0)}) == len(prompts)  # rows draw with their own keys


def test_decode_step_compiles_once_across_prompt_lengths(model):
    prompts = [[TextSegment(list(range(10, 10 + n)))] for n in range(1, 11)]
    decode_before, prefill_before = decoding.decode_step._cache_size(), kv_cache.chunk_step._cache_size()
    for prompt in prompts:  # a cache size no other test uses, so the first prompt compiles and no other does
        generate(model, [prompt], 4, max_len=200)
    assert decoding.decode_step._cache_size() - decode_before == 1
    # Prefill chunks are bucketed: texts of 3..12 tokens share the 16-token bucket.
    assert kv_cache.chunk_step._cache_size() - prefill_before == 1


def test_stops_at_im_end_and_at_max_length(model):
    prompts, items = make_prompts(np.random.default_rng(0))
    plain = generate(model, prompts, MAX_NEW)
    assert all(len(row) == MAX_NEW for row in plain)  # no row predicts <|im_end|>: all stop at max length
    assert generate(model, prompts, 0) == [[]] * len(prompts)
    # Give <|im_end|> 1.5 x the lm_head column of a token the rows predict: each row now stops where that
    # token's logit is positive and large enough, i.e. at different steps (seen: after 0, 2, 4 tokens and never).
    eos_model = nnx.clone(model)
    kernel = eos_model.language_model.lm_head.kernel
    kernel[...] = kernel[...].at[:, EOS].set(1.5 * kernel[...][:, plain[0][-1]])
    got = generate(eos_model, prompts, MAX_NEW)
    assert got == [greedy_by_recompute(eos_model, it, MAX_NEW) for it in items]
    lengths = [len(row) for row in got]
    assert 0 in lengths and MAX_NEW in lengths and any(0 < n < MAX_NEW for n in lengths), lengths


def test_prompt_filling_the_cache_to_its_end(model):
    """The last chunk (12 tokens, bucket 16) would run past a 64-slot cache; it must not shift over the cache."""
    prompt = [TextSegment(list(range(48))), TextSegment(list(range(10)))]
    tight, roomy = prefill(model, prompt, 64), prefill(model, prompt, 256)
    assert tight.kv_len == roomy.kv_len == prompt_length(prompt) == 62
    np.testing.assert_allclose(np.asarray(tight.cache.keys[:, :62]), np.asarray(roomy.cache.keys[:, :62]),
                               atol=1e-5)


def test_clear_errors(model):
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[TextSegment([1])]], 2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[TextSegment([1])]], 2, temperature=-1.0)
    with pytest.raises(ValueError, match="max_len"):
        generate(model, [[TextSegment([1] * 10)]], 8, max_len=16)
    with pytest.raises(ValueError, match="segment 0"):
        generate(model, [[[1, 2]]], 2)
    with pytest.raises(ValueError, match="max_len 32"):
        decoding.decode([Context.new(model, 32).add_text([1] * 20)], 20)
