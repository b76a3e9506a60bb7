"""Qwen2 LLM: parity with HuggingFace Qwen2/Qwen3 (packed samples, QK-norm), attention backends, packing invariance.

Every HF weight is randomised (norm scales 1+0.1N, non-zero biases), so a mis-mapped or ignored parameter, a wrong
norm/RoPE placement or an attention leak between packed samples fails the comparison.
"""

import inspect
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from unimedvl_jax.config import llm_config
from unimedvl_jax.models.attention import TokenMeta, packed_attention
from unimedvl_jax.models.llm import Qwen2ForCausalLM
from unimedvl_jax.packed_batch import CAUSAL, FULL, NOISE
from unimedvl_jax.testing import param_dict

TOL = 1e-4  # parity with HF (fp32)
SAME_TOL = 1e-6  # our own paths against each other

HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB = 64, 2, 4, 2, 128, 256
ROPE_THETA, RMS_EPS = 10_000.0, 1e-5  # deliberately not the released defaults (1e6, 1e-6): they must pass through
LENGTHS = (7, 12)  # two causal text samples of different lengths, packed into one sequence




def _randomise(hf_model, seed):
    """Overwrite every HF parameter: norm scales 1+0.1N, biases 0.1N, matrices N/sqrt(fan_in), embeddings N."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))


def _load_from_hf(hf_model, ours, skip=()):
    """Copy an HF Qwen state dict into our model (Linear weights transposed to (in, out) kernels).

    Every parameter of ours must be written exactly once, so nothing silently keeps its random init."""
    params = param_dict(ours)
    written = set()
    for name, tensor in hf_model.state_dict().items():
        if name in skip:
            continue
        value = tensor.detach().numpy()
        if name.endswith(".weight") and value.ndim == 2 and "embed_tokens" not in name:
            target, value = name[: -len(".weight")] + ".kernel", value.T
        else:
            target = name
        assert target in params, f"HF parameter {name} has no counterpart {target}"
        var = params[target]
        assert var[...].shape == value.shape, (target, var[...].shape, value.shape)
        var.set_value(jnp.asarray(value))
        written.add(target)
    assert written == set(params), f"not loaded from HF: {sorted(set(params) - written)}"


def _ours(qk_norm):
    cfg = llm_config(hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS,
                     intermediate_size=INTER, vocab_size=VOCAB, qk_norm=qk_norm, layer_module="dense",
                     rope_theta=ROPE_THETA, rms_norm_eps=RMS_EPS)
    return Qwen2ForCausalLM(cfg, dtype="float32", rngs=nnx.Rngs(0))


def _samples(lengths, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=n) for n in lengths]


def _packed_inputs(samples, pad=0):
    """Packed causal text: ids, per-sample restarting position ids, and TokenMeta (one split per sample).

    `pad` padding tokens (id 0) are appended as an extra causal sample of their own."""
    ids = np.concatenate(list(samples) + [np.zeros(pad, np.int64)])
    lengths = [len(s) for s in samples] + ([pad] if pad else [])
    sample = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
    pos = np.concatenate([np.arange(n) for n in lengths])
    t = len(ids)
    meta = TokenMeta(jnp.asarray(sample, jnp.int32), jnp.asarray(sample, jnp.int32),
                     jnp.full((t,), CAUSAL, jnp.int32), jnp.arange(t, dtype=jnp.int32))
    return jnp.asarray(ids, jnp.int32), jnp.asarray(pos, jnp.int32), meta


@nnx.jit(static_argnames=("backend", "block_size"))
def _forward(model, ids, pos, meta, *, backend, block_size):
    hidden, _, _ = model(model.embed(ids), pos, meta, expert_indexes=[None], backend=backend, block_size=block_size)
    return model.logits(hidden)


def _our_logits(model, samples, *, pad=0, backend="dense", block_size=512):
    ids, pos, meta = _packed_inputs(samples, pad)
    return np.asarray(_forward(model, ids, pos, meta, backend=backend, block_size=block_size))


def _hf_logits(hf_model, samples):
    """Each sample run alone through HF (batch 1), concatenated in packing order."""
    with torch.no_grad():
        outs = [hf_model(input_ids=torch.as_tensor(s)[None]).logits[0].numpy() for s in samples]
    return np.concatenate(outs, axis=0)


@pytest.fixture(scope="module")
def qwen2_pair():
    from transformers import Qwen2Config
    from transformers import Qwen2ForCausalLM as HFQwen2

    hf_cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, hidden_act="silu",
                         rope_theta=ROPE_THETA, rms_norm_eps=RMS_EPS, tie_word_embeddings=False,
                         use_sliding_window=False, attn_implementation="eager", torch_dtype=torch.float32)
    hf = HFQwen2(hf_cfg).eval()
    _randomise(hf, seed=0)
    ours = _ours(qk_norm=False)
    _load_from_hf(hf, ours)
    return hf, ours


@pytest.fixture(scope="module")
def qwen3_pair():
    """HF Qwen3 = Qwen2 + per-head q/k RMSNorm before RoPE; with attention_bias it also has q/k/v biases (ours) and an
    o_proj bias (not ours, zeroed here and not loaded)."""
    from transformers import Qwen3Config
    from transformers import Qwen3ForCausalLM as HFQwen3

    hf_cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS,
                         hidden_act="silu", rope_theta=ROPE_THETA, rms_norm_eps=RMS_EPS, attention_bias=True,
                         tie_word_embeddings=False, use_sliding_window=False, attn_implementation="eager",
                         torch_dtype=torch.float32)
    hf = HFQwen3(hf_cfg).eval()
    _randomise(hf, seed=2)
    o_bias = [f"model.layers.{i}.self_attn.o_proj.bias" for i in range(LAYERS)]
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.bias.zero_()
    ours = _ours(qk_norm=True)
    _load_from_hf(hf, ours, skip=o_bias)
    return hf, ours


def test_dense_matches_hf_qwen2_on_packed_samples(qwen2_pair):
    hf, ours = qwen2_pair
    samples = _samples(LENGTHS)
    expected = _hf_logits(hf, samples)
    got = _our_logits(ours, samples)
    assert got.shape == (sum(LENGTHS), VOCAB)
    assert np.abs(expected).max() > 1.0  # non-trivial logits
    diff = np.abs(got - expected).max()
    assert diff <= TOL, diff


def test_qk_norm_and_qkv_bias_match_hf_qwen3(qwen3_pair):
    hf, ours = qwen3_pair
    # The HF Qwen3 attention (this transformers version) norms q/k per head before RoPE, as docs/model.md §3.2
    # and docs/model.md §3.3 require.
    from transformers.models.qwen3 import modeling_qwen3

    src = inspect.getsource(modeling_qwen3.Qwen3Attention.forward)
    assert src.index("self.q_norm(") < src.index("apply_rotary_pos_emb(")
    assert hf.model.layers[0].self_attn.q_norm.weight.shape == (HIDDEN // HEADS,)

    samples = _samples(LENGTHS, seed=3)
    expected = _hf_logits(hf, samples)
    got = _our_logits(ours, samples)
    assert np.abs(expected).max() > 1.0
    diff = np.abs(got - expected).max()
    assert diff <= TOL, diff


@pytest.mark.parametrize("qk_norm", [False, True])
def test_chunked_backend_matches_dense(qk_norm):
    """Whole LLM, same packed batch through both backends. The package's own init keeps activations O(1) (logits
    |x| < 1), where 1e-6 absolute is a few fp32 ulps; with the HF-randomised weights above the residual stream reaches
    |x| ~ 7 and the two summation orders differ by ~1.5e-6 (3-4 ulp), so those weights are not used here."""
    ours = _ours(qk_norm=qk_norm)
    samples = _samples((7, 12, 10), seed=4)  # 29 tokens: not a multiple of the block size
    assert sum(len(s) for s in samples) % 16
    dense = _our_logits(ours, samples, backend="dense")
    chunked = _our_logits(ours, samples, backend="chunked", block_size=16)
    assert np.abs(dense).max() > 0.1
    diff = np.abs(dense - chunked).max()
    assert diff <= SAME_TOL, diff


def test_chunked_attention_op_matches_dense_with_sharp_scores():
    """packed_attention alone: sharp scores (std ~4), GQA, causal + full + noise splits over two packed samples,
    45 tokens with block 16 (partial last block). Outputs are convex combinations of v, so |out| <= max|v|;
    v is kept O(1) so that 1e-6 absolute is a few fp32 ulps (v ~ N(0,1) reaches |out| ~ 4 and 8e-7 differences)."""
    rng = np.random.default_rng(6)
    # (sample, split, mode, length)
    spans = [(0, 0, CAUSAL, 10), (0, 1, FULL, 8), (0, 2, NOISE, 6), (0, 3, CAUSAL, 5), (1, 4, CAUSAL, 16)]
    sample = np.concatenate([np.full(n, s) for s, _, _, n in spans])
    split = np.concatenate([np.full(n, sp) for _, sp, _, n in spans])
    mode = np.concatenate([np.full(n, m) for _, _, m, n in spans])
    t = len(sample)
    meta = TokenMeta(jnp.asarray(sample, jnp.int32), jnp.asarray(split, jnp.int32), jnp.asarray(mode, jnp.int32),
                     jnp.arange(t, dtype=jnp.int32))
    d = HIDDEN // HEADS
    q = jnp.asarray(2.0 * rng.standard_normal((t, HEADS, d)), jnp.float32)
    k = jnp.asarray(2.0 * rng.standard_normal((t, KV_HEADS, d)), jnp.float32)
    v = jnp.asarray(0.5 * rng.standard_normal((t, KV_HEADS, d)), jnp.float32)  # |out| <= max|v| ~ 2
    dense = np.asarray(packed_attention(q, k, v, meta, meta, backend="dense"))
    chunked = np.asarray(packed_attention(q, k, v, meta, meta, backend="chunked", block_size=16))
    assert t % 16 and np.isfinite(dense).all()
    diff = np.abs(dense - chunked).max()
    assert diff <= SAME_TOL, diff


@pytest.mark.parametrize("backend", ["dense", "chunked"])
def test_trailing_padding_changes_no_real_logits(qwen3_pair, backend):
    _, ours = qwen3_pair
    samples = _samples(LENGTHS, seed=5)
    n = sum(LENGTHS)
    plain = _our_logits(ours, samples, backend=backend, block_size=16)
    padded = _our_logits(ours, samples, pad=6, backend=backend, block_size=16)
    assert padded.shape == (n + 6, VOCAB)
    diff = np.abs(padded[:n] - plain).max()
    assert diff <= SAME_TOL, diff
