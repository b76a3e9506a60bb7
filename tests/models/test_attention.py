"""Packed attention (docs/packed_sequence.md §4.3): the mask against the official recorded masks, and the dense vs
chunked backends."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from unimedvl_jax import config as C
from unimedvl_jax.interop.official_batch import official_to_packed_batch
from unimedvl_jax.interop.safetensors_io import SafetensorsReader
from unimedvl_jax.models.attention import TokenMeta, allowed, packed_attention
from unimedvl_jax.packed_batch import CAUSAL, FULL, NOISE
from unimedvl_jax.testing import Text, VaeImage, VitImage, build_packed_batch

TRAIN_FIXTURES = ["train_mixed_fp32", "train_vqa_t2i_fp32", "train_t2i_fp32"]


def _meta(batch) -> TokenMeta:
    n = batch.num_tokens
    return TokenMeta(jnp.asarray(batch.sample_id), jnp.asarray(batch.split_id), jnp.asarray(batch.split_mode),
                     jnp.arange(n, dtype=jnp.int32))


@pytest.mark.parametrize("pad_tokens", [0, 9])
@pytest.mark.parametrize("name", TRAIN_FIXTURES)
def test_allowed_matches_official_masks(official_dir, name, pad_tokens):
    """allowed(meta, meta) equals every recorded attn_allowed_sample{i} block; cross-sample entries are False."""
    manifest = json.loads((official_dir / "manifest.json").read_text())
    modes = manifest["fixtures"][name]["batch"]["attn_modes"]
    reader = SafetensorsReader(official_dir / f"{name}.safetensors")
    tensors = {k: reader.get(k) for k in reader.keys()}
    batch, _ = official_to_packed_batch(tensors, modes, latent_channels=tensors.get("padded_latent",
                                                                                    np.zeros((1, 4))).shape[1],
                                        pad_tokens=pad_tokens)
    mask = np.asarray(allowed(_meta(batch), _meta(batch)))
    sample_lens = tensors["sample_lens"].astype(int)
    assert mask.shape == (sample_lens.sum() + pad_tokens,) * 2
    starts = np.concatenate([[0], np.cumsum(sample_lens)])
    for i, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        expected = tensors[f"attn_allowed_sample{i}"]
        np.testing.assert_array_equal(mask[a:b, a:b], expected, err_msg=f"{name} sample {i}")
        outside = np.ones(mask.shape[0], bool)
        outside[a:b] = False
        assert not mask[a:b][:, outside].any(), f"{name}: sample {i} attends outside itself"
        assert not mask[outside][:, a:b].any(), f"{name}: sample {i} is attended from outside"
    # The official masks themselves exercise every rule: causal text, bidirectional images, hidden noise.
    recorded = [tensors[f"attn_allowed_sample{i}"] for i in range(len(sample_lens))]
    assert any(not m.all() and not np.array_equal(m, np.tril(np.ones_like(m))) for m in recorded)


def _mixed_layout():
    """Metadata of a pack with causal / full / noise splits over three samples plus a causal pad sample."""
    cfg = C.model_config(
        llm=C.llm_config(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, vocab_size=64),
        vit=C.vit_config(image_size=112), vit_max_num_patch_per_side=8, max_latent_size=8,
        vae=C.vae_config(z_channels=4),
        special_tokens=ConfigDict(dict(bos_token_id=60, eos_token_id=61, start_of_image=62, end_of_image=63)))
    samples = [
        [Text([1, 2, 3]), VaeImage((2, 3), noised=True, timestep=0.5), VaeImage((2, 2)), Text([4, 5], loss=True)],
        [VitImage((2, 2)), Text([6, 7, 8, 9], loss=True)],
        [Text([10]), VaeImage((3, 2), noised=True)],
    ]
    batch, _, _ = build_packed_batch(samples, cfg, pad_to=83)
    assert {int(m) for m in batch.split_mode} == {CAUSAL, FULL, NOISE}
    return _meta(batch)


@pytest.mark.parametrize("block_size", [16, 32])
def test_dense_and_chunked_backends_agree(block_size):
    """The chunked online-softmax backend reproduces the dense one (values 1e-6, gradients 1e-5) under GQA."""
    meta = _mixed_layout()
    t, hq, hkv, d = meta.length, 4, 2, 16
    assert t % block_size, "the length must not be a multiple of the block size"
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (t, hq, d))
    k = jax.random.normal(keys[1], (t, hkv, d))
    v = jax.random.normal(keys[2], (t, hkv, d))
    cot = jax.random.normal(keys[3], (t, hq, d))

    def run(backend):
        def loss(q, k, v):
            out = packed_attention(q, k, v, meta, meta, backend=backend, block_size=block_size)
            return jnp.sum(out * cot), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return out, grads

    out_d, grads_d = run("dense")
    out_c, grads_c = run("chunked")
    assert float(jnp.abs(out_d).max()) > 0.1
    np.testing.assert_allclose(out_c, out_d, atol=1e-6, rtol=0)
    for name, gd, gc in zip("qkv", grads_d, grads_c):
        assert float(jnp.abs(gd).max()) > 1e-3, f"d/d{name} is trivially zero"
        np.testing.assert_allclose(gc, gd, atol=1e-5, rtol=0, err_msg=f"d/d{name}")


def test_dense_attention_matches_explicit_softmax():
    """The dense backend is softmax(q·k/√d + mask) v with query head h reading KV head h // G (docs/model.md §3.3)."""
    meta = _mixed_layout()
    t, hq, hkv, d = meta.length, 4, 2, 16
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((t, hq, d), (t, hkv, d), (t, hkv, d)))
    out = np.asarray(packed_attention(q, k, v, meta, meta, backend="dense"))
    mask = np.asarray(allowed(meta, meta))
    for h in range(hq):
        kv = h // (hq // hkv)
        s = np.where(mask, q[:, h].astype(np.float64) @ k[:, kv].T / np.sqrt(d), -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        ref = (p / p.sum(-1, keepdims=True)) @ v[:, kv]
        np.testing.assert_allclose(out[:, h], ref, atol=1e-5, rtol=0, err_msg=f"head {h}")
