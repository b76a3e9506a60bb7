"""UniMedVL training forward on hand-built packs (docs/model.md §3.4, docs/model.md §3.10, docs/model.md §3.11,
docs/packed_sequence.md §4.2–4.6): an independent NumPy MoT layer, packing and padding invariance, noise-split
isolation, expert separation, and the CE / MSE loss semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimedvl_jax.models.attention import TokenMeta
from unimedvl_jax.models.layers import rope_cos_sin
from unimedvl_jax.models.unimedvl import UniMedVL, packed_loss
from unimedvl_jax.packed_batch import NOISE, PAD, TEXT, VAE, VIT
from unimedvl_jax.testing import Text, VaeImage, VitImage, build_packed_batch, small_model_config

EXPERT_SUFFIXES = ("", "_moe_gen")  # und, gen (docs/model.md §1.5)


def tiny_config():
    """A 2-layer MoT with every path on. The VAE is minimal: these tests feed latents directly, never pixels."""
    return small_model_config()


CFG = tiny_config()
LP, Z = CFG.latent_patch_size, CFG.vae.z_channels
# One static shape for most packs, so the jitted forward compiles once per module.
STATIC = dict(pad_to=64, capacities=dict(und=48, gen=24, ce=16, vit=12, vae=24, vae_images=3))


def _params(module):
    """{dotted path: Param} over every parameter of `module`."""
    return {".".join(map(str, p)): v for p, v in nnx.iter_graph(module) if isinstance(v, nnx.Param)}


@pytest.fixture(scope="module")
def model():
    """The tiny model with a non-zero llm2vae (zero-initialised by design, which would hide the MSE path)."""
    m = UniMedVL(CFG, rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(42), 2)
    m.llm2vae.kernel[...] = 0.1 * jax.random.normal(keys[0], m.llm2vae.kernel.shape)
    m.llm2vae.bias[...] = 0.1 * jax.random.normal(keys[1], m.llm2vae.bias.shape)
    return m


@nnx.jit
def forward(model, batch, latents, noise):
    return model(batch, latents, noise)


def run(model, samples, **kw):
    batch, latents, noise = build_packed_batch(samples, CFG, **kw)
    return batch, latents, noise, forward(model, batch, latents, noise)


_RNG = np.random.default_rng(7)


def vit(h, w):
    return VitImage((h, w), pixels=_RNG.uniform(-1, 1, (14 * h, 14 * w, 3)).astype(np.float32))


def vae(h, w, noised=False, timestep=0.0):
    return VaeImage((h, w), noised=noised, timestep=timestep,
                    latent=_RNG.standard_normal((LP * h, LP * w, Z)).astype(np.float32),
                    noise=_RNG.standard_normal((h * w, LP * LP * Z)).astype(np.float32))


def txt(n, loss=False):
    return Text(_RNG.integers(0, 250, n).tolist(), loss=loss)


S_UND = [vit(2, 3), txt(5), txt(4, loss=True)]                                    # VQA-like: 21 tokens
S_GEN = [txt(6), vae(2, 3, noised=True, timestep=0.3), vae(2, 2), vit(2, 2), txt(4, loss=True)]  # edit: 34 tokens


# --------------------------------------------------------------------------------------------------------------
# 1. One MoT decoder layer against an independent NumPy reference written from docs/model.md §3.1–3.4 and
# docs/packed_sequence.md §4.3
# --------------------------------------------------------------------------------------------------------------

def _np_rmsnorm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _np_rope(x, pos, theta):
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = np.concatenate([pos * inv, pos * inv])
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return x * np.cos(ang) + rot * np.sin(ang)


def _np_allowed(sample, split, mode, i, j):
    """docs/packed_sequence.md §4.3 rule for query i, key j, written out token by token."""
    if sample[i] != sample[j]:
        return False
    if mode[j] == NOISE and split[j] != split[i]:
        return False
    return j <= i or (split[i] == split[j] and mode[i] != 0)


def _np_mot_layer(w, x, expert, pos, sample, split, mode, cfg):
    """Per token t with expert e = expert[t]: h = x + O_e(attn); out = h + MLP_e(N2_e(h)) (docs/model.md §3.4)."""
    t_len, hidden = x.shape
    nh, nkv = cfg.num_heads, cfg.num_kv_heads
    d = hidden // nh
    q = np.zeros((t_len, nh, d))
    k = np.zeros((t_len, nkv, d))
    v = np.zeros((t_len, nkv, d))
    for t in range(t_len):
        e = EXPERT_SUFFIXES[expert[t]]
        xn = _np_rmsnorm(x[t], w[f"input_layernorm{e}.weight"], cfg.rms_norm_eps)
        qt = (xn @ w[f"self_attn.q_proj{e}.kernel"] + w[f"self_attn.q_proj{e}.bias"]).reshape(nh, d)
        kt = (xn @ w[f"self_attn.k_proj{e}.kernel"] + w[f"self_attn.k_proj{e}.bias"]).reshape(nkv, d)
        vt = (xn @ w[f"self_attn.v_proj{e}.kernel"] + w[f"self_attn.v_proj{e}.bias"]).reshape(nkv, d)
        qt = _np_rmsnorm(qt, w[f"self_attn.q_norm{e}.weight"], cfg.rms_norm_eps)
        kt = _np_rmsnorm(kt, w[f"self_attn.k_norm{e}.weight"], cfg.rms_norm_eps)
        q[t], k[t], v[t] = _np_rope(qt, pos[t], cfg.rope_theta), _np_rope(kt, pos[t], cfg.rope_theta), vt
    out = np.zeros_like(x)
    for t in range(t_len):
        e = EXPERT_SUFFIXES[expert[t]]
        keys = [j for j in range(t_len) if _np_allowed(sample, split, mode, t, j)]
        heads = []
        for h in range(nh):
            kv = h // (nh // nkv)
            s = np.array([q[t, h] @ k[j, kv] for j in keys]) / np.sqrt(d)
            p = np.exp(s - s.max())
            heads.append((p / p.sum()) @ v[keys, kv])
        hres = x[t] + np.concatenate(heads) @ w[f"self_attn.o_proj{e}.kernel"]
        z = _np_rmsnorm(hres, w[f"post_attention_layernorm{e}.weight"], cfg.rms_norm_eps)
        gate, up = z @ w[f"mlp{e}.gate_proj.kernel"], z @ w[f"mlp{e}.up_proj.kernel"]
        out[t] = hres + (gate / (1 + np.exp(-gate)) * up) @ w[f"mlp{e}.down_proj.kernel"]
    return out


def test_decoder_layer_matches_numpy_mot_reference(model):
    """DecoderLayer on a mixed und/gen pack (two samples, all split modes, padding) equals the NumPy MoT layer."""
    layer = nnx.clone(model.language_model.model.layers[0])
    rng = np.random.default_rng(3)
    for path, var in _params(layer).items():  # every weight distinct per expert, norms included
        is_norm = path.endswith("norm.weight") or "norm_moe_gen" in path
        scale = 0.2 if var.ndim == 1 else var.shape[0] ** -0.5  # kernels ~ N(0, 1/fan_in): O(1) activations
        var[...] = jnp.asarray(float(is_norm) + scale * rng.standard_normal(var.shape), jnp.float32)
    w = {p: np.asarray(v[...], np.float64) for p, v in _params(layer).items()}
    # per expert: q,k,v (+bias), o, q/k norm, 3 MLP, 2 norms
    assert any("_moe_gen" in p for p in w) and len(w) == 2 * 14

    batch, _, _ = build_packed_batch([S_GEN, [vit(2, 2), txt(3, loss=True), vae(2, 2)]], CFG, pad_to=60,
                                     capacities=dict(und=48, gen=20))
    kind = np.asarray(batch.token_kind)
    assert {TEXT, VIT, VAE, PAD} <= set(kind.tolist())
    x = rng.standard_normal((batch.num_tokens, CFG.llm.hidden_size)).astype(np.float32)
    meta = TokenMeta(batch.sample_id, batch.split_id, batch.split_mode, np.arange(batch.num_tokens, dtype=np.int32))
    cos, sin = rope_cos_sin(jnp.asarray(batch.position_ids), CFG.llm.hidden_size // CFG.llm.num_heads,
                            CFG.llm.rope_theta, jnp.float32)
    got = np.asarray(layer(jnp.asarray(x), [batch.und_index, batch.gen_index], cos, sin, meta, backend="dense",
                           block_size=16)[0])

    real = np.nonzero(kind != PAD)[0]
    expert = np.where(kind == VAE, 1, 0)
    ref = _np_mot_layer(w, x[real].astype(np.float64), expert[real], batch.position_ids[real].astype(np.float64),
                        batch.sample_id[real], batch.split_id[real], batch.split_mode[real], CFG.llm)
    np.testing.assert_allclose(got[real], ref, atol=1e-5, rtol=0)
    assert np.all(np.isfinite(got))


# --------------------------------------------------------------------------------------------------------------
# 2. Packing, noise isolation, expert separation
# --------------------------------------------------------------------------------------------------------------

def _counts(batch):
    """(tokens, CE slots, VAE tokens) of the real part of a pack."""
    return (int(np.sum(batch.token_kind != PAD)), int(np.sum(batch.ce_index < batch.num_tokens)),
            int(np.sum(batch.vae_token_index < batch.num_tokens)))


def test_packing_two_samples_equals_running_each_alone(model):
    """Per-token CE, MSE and hidden states of a sample do not depend on what else is in the pack
    (docs/packed_sequence.md §4.3 (a))."""
    b_pack, _, _, out_pack = run(model, [S_UND, S_GEN], **STATIC)
    offsets = [0, 0, 0]
    for sample in (S_UND, S_GEN):
        b, _, _, out = run(model, [sample], **STATIC)
        (t, n_ce, n_vae), (o_t, o_ce, o_vae) = _counts(b), offsets
        assert n_ce > 0
        np.testing.assert_allclose(out_pack.hidden[o_t:o_t + t], out.hidden[:t], atol=1e-5, rtol=0)
        np.testing.assert_allclose(out_pack.ce[o_ce:o_ce + n_ce], out.ce[:n_ce], atol=1e-5, rtol=0)
        np.testing.assert_allclose(out_pack.mse[o_vae:o_vae + n_vae], out.mse[:n_vae], atol=1e-5, rtol=0)
        offsets = [o_t + t, o_ce + n_ce, o_vae + n_vae]
    assert offsets == list(_counts(b_pack))
    assert int(out_pack.mse_mask.sum()) == 6 and float(out_pack.mse.max()) > 0


def _later_text_logits(model, batch, out, after):
    """lm_head logits of every text token at or after sequence index `after`."""
    idx = np.nonzero((np.asarray(batch.token_kind) == TEXT) & (np.arange(batch.num_tokens) >= after))[0]
    return np.asarray(model.language_model.logits(out.hidden[idx]))


def test_noised_image_is_invisible_to_later_tokens(model):
    """Perturbing a noised target changes nothing outside its split; perturbing a clean condition does
    (docs/packed_sequence.md §4.3 (c))."""
    noised, clean = vae(2, 2, noised=True, timestep=0.5), vae(2, 3)
    prompt, answer = txt(5), txt(4, loss=True)
    batch, _, _, base = run(model, [[prompt, noised, clean, answer]], **STATIC)
    split_mode = np.asarray(batch.split_mode)
    in_noise = split_mode == NOISE
    after = int(np.nonzero(in_noise)[0].max()) + 1
    base_logits = _later_text_logits(model, batch, base, after)
    assert base_logits.shape[0] == 2 + 6  # the clean image's markers + the answer text

    moved = VaeImage(noised.latent_hw, noised=True, timestep=0.5, latent=noised.latent + 1.5,
                     noise=-noised.noise)
    _, _, _, out = run(model, [[prompt, moved, clean, answer]], **STATIC)
    assert float(jnp.abs(out.mse - base.mse).max()) > 1e-3, "the perturbation must reach the noised tokens"
    np.testing.assert_array_equal(out.hidden[~in_noise], base.hidden[~in_noise])
    np.testing.assert_allclose(_later_text_logits(model, batch, out, after), base_logits, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(out.ce, base.ce)

    moved_clean = VaeImage(clean.latent_hw, latent=clean.latent + 1.5, noise=clean.noise)
    _, _, _, out = run(model, [[prompt, noised, moved_clean, answer]], **STATIC)
    assert np.abs(_later_text_logits(model, batch, out, after) - base_logits).max() > 1e-3
    np.testing.assert_array_equal(out.mse, base.mse)  # the noised target precedes the clean copy


def test_gen_expert_weights_do_not_touch_understanding_tokens(model):
    """Changing every *_moe_gen weight leaves a text/ViT pack bitwise unchanged; changing the und MLP does not."""
    batch, latents, noise, base = run(model, [S_UND], **STATIC)
    assert int(np.sum(batch.gen_index < batch.num_tokens)) == 0 and batch.gen_index.shape[0] > 0
    gen_batch, gen_latents, gen_noise, gen_base = run(model, [S_GEN], **STATIC)

    changed = nnx.clone(model)
    rng = np.random.default_rng(5)
    gen_params = {p: v for p, v in _params(changed.language_model).items() if "_moe_gen" in p}
    for var in gen_params.values():
        var[...] = var[...] + jnp.asarray(0.5 * rng.standard_normal(var.shape), jnp.float32)
    names = {p.split(".")[-2] for p in gen_params}
    assert {"q_proj_moe_gen", "k_norm_moe_gen", "mlp_moe_gen", "input_layernorm_moe_gen",
            "post_attention_layernorm_moe_gen", "norm_moe_gen"} <= names | {p.split(".")[-3] for p in gen_params}
    out = forward(changed, batch, latents, noise)
    for field in ("hidden", "ce", "ce_logits", "input_embeds"):
        np.testing.assert_array_equal(getattr(out, field), getattr(base, field), err_msg=field)
    gen_out = forward(changed, gen_batch, gen_latents, gen_noise)
    assert float(jnp.abs(gen_out.mse - gen_base.mse).max()) > 1e-3, "the gen weights must matter for VAE tokens"

    und = nnx.clone(model)
    up = und.language_model.model.layers[0].mlp.up_proj.kernel
    up[...] = up[...] + jnp.asarray(0.5 * rng.standard_normal(up.shape), jnp.float32)
    out = forward(und, batch, latents, noise)
    assert float(jnp.abs(out.ce - base.ce).max()) > 1e-4


# --------------------------------------------------------------------------------------------------------------
# 3. Loss semantics (docs/model.md §3.11, docs/packed_sequence.md §4.6) and padding invariance
# --------------------------------------------------------------------------------------------------------------

def _np_patchify(latent, h, w):
    """(p·h, p·w, C) -> (h·w, p·p·C) in (py, px, c) order, written from docs/model.md §3.10."""
    tokens = []
    for r in range(h):
        for c in range(w):
            tokens.append(latent[LP * r: LP * r + LP, LP * c: LP * c + LP].reshape(-1))
    return np.stack(tokens)


def test_loss_semantics(model):
    """t=sigmoid(n), clean tokens have no MSE, CE only at loss positions, packed_loss = Σ/N per term."""
    # a tiny t > 0 still counts (docs/model.md §3.11 step 8)
    noised, clean = vae(2, 3, noised=True, timestep=-12.0), vae(2, 2)
    items = [txt(3), noised, clean, Text([5, 6, 7], loss=True)]
    batch, latents, noise, out = run(model, [S_UND, items], **STATIC)
    t_len = batch.num_tokens
    real_vae = np.asarray(batch.vae_token_index) < t_len
    is_noised = np.asarray(batch.vae_timestep) > -np.inf
    np.testing.assert_array_equal(out.mse_mask, real_vae & is_noised)
    assert int(out.mse_mask.sum()) == 6
    expected_t = np.where(is_noised, 1 / (1 + np.exp(-np.asarray(batch.vae_timestep, np.float64))), 0.0)
    np.testing.assert_allclose(out.t, expected_t, rtol=1e-6, atol=0)
    assert np.all(np.asarray(out.t)[is_noised & real_vae] > 0) and np.all(np.asarray(out.mse)[~is_noised] == 0)

    # MSE target ε − x₀ with x₀ patchified independently.
    x0 = np.concatenate([_np_patchify(noised.latent, 2, 3), _np_patchify(clean.latent, 2, 2)])
    eps = np.concatenate([noised.noise, clean.noise])
    n_real = x0.shape[0]
    mse_ref = np.mean((np.asarray(out.mse_preds)[:n_real] - (eps - x0)) ** 2, axis=-1)
    np.testing.assert_allclose(out.mse[:6], mse_ref[:6], rtol=1e-5, atol=1e-6)

    # CE exactly at [bos, t1..tL] of the loss texts, labels shifted by one.
    ce_pos = np.asarray(batch.ce_index)[np.asarray(out.ce_mask)]
    ids = np.asarray(batch.text_ids)
    np.testing.assert_array_equal(np.asarray(batch.ce_labels)[: len(ce_pos)], ids[ce_pos + 1])
    assert len(ce_pos) == 5 + 4 and ids[ce_pos[-4]] == CFG.special_tokens.bos_token_id
    logits = np.asarray(model.language_model.logits(out.hidden[ce_pos]), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce_ref = lse - logits[np.arange(len(ce_pos)), ids[ce_pos + 1]]
    np.testing.assert_allclose(np.asarray(out.ce)[: len(ce_pos)], ce_ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out.ce)[len(ce_pos):] == 0)

    loss, terms = packed_loss(out, batch.ce_weight)
    np.testing.assert_allclose(terms["ce"], ce_ref.sum() / len(ce_pos), rtol=1e-5)
    np.testing.assert_allclose(terms["mse"], mse_ref[:6].sum() / 6, rtol=1e-5)
    np.testing.assert_allclose(loss, terms["ce"] + terms["mse"], rtol=1e-6)
    assert int(terms["n_ce"]) == 9 and int(terms["n_mse"]) == 6


def test_pack_without_noised_image_has_zero_mse_and_finite_gradients(model):
    """An understanding-only pack (clean VAE condition, no target) trains: MSE term 0, no NaN (docs/quirks.md §10.8)."""
    batch, latents, noise = build_packed_batch([S_UND, [txt(3), vae(2, 2), Text([8, 9], loss=True)]], CFG,
                                               **STATIC)
    assert not np.any(np.asarray(batch.vae_timestep) > -np.inf) and np.any(batch.vae_token_index < batch.num_tokens)

    @nnx.jit
    def loss_and_grads(m):
        def f(m):
            loss, terms = packed_loss(m(batch, latents, noise), batch.ce_weight)
            return loss, terms
        return nnx.value_and_grad(f, has_aux=True)(m)

    (loss, terms), grads = loss_and_grads(model)
    assert int(terms["n_mse"]) == 0 and float(terms["mse"]) == 0.0
    assert np.isfinite(float(loss)) and float(loss) == pytest.approx(float(terms["ce"]))
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.abs(grads["language_model"]["lm_head"]["kernel"][...]).max()) > 0
    assert float(jnp.abs(grads["llm2vae"]["kernel"][...]).max()) == 0.0


@pytest.mark.parametrize("padding", ["sequence_and_buffers", "buffers_only"])
@pytest.mark.parametrize("samples", [[S_UND, S_GEN], [S_UND]], ids=["mixed", "und_only"])
def test_padding_invariance(model, samples, padding):
    """Padding the sequence and/or every buffer (causal pad sample, index-T slots) changes no per-token value.

    Without sequence padding the last real token sits at T-1, where a clipped (instead of dropped) padding slot
    would land.
    """
    b0, _, _, exact = run(model, samples)
    t, n_ce, n_vae = _counts(b0)
    assert b0.num_tokens == t and b0.ce_index.shape[0] == n_ce  # no padding at all
    static = STATIC if padding == "sequence_and_buffers" else dict(capacities=STATIC["capacities"])
    b1, _, _, padded = run(model, samples, **static)
    assert np.any(b1.token_kind == PAD) == (padding == "sequence_and_buffers")
    assert np.any(b1.gen_index == b1.num_tokens) and np.any(b1.vit_token_index == b1.num_tokens)
    # A different T changes XLA's reduction order, so values move by float32 rounding only (they agree exactly
    # in float64 for this pack). Per-token losses: 1e-6 absolute plus 1e-6 relative (a few float32 ulp at
    # ce ≈ log(vocab) ≈ 5.5). Normed hidden states (|h| up to ≈4, all tokens) carry ≈1e-6 of accumulated
    # rounding: compared at 5e-6.
    np.testing.assert_allclose(padded.hidden[:t], exact.hidden, atol=5e-6, rtol=0)
    np.testing.assert_allclose(padded.ce[:n_ce], exact.ce, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(padded.mse[:n_vae], exact.mse, atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(padded.mse_mask[:n_vae], exact.mse_mask)
    assert not np.any(padded.ce_mask[n_ce:]) and not np.any(padded.mse_mask[n_vae:])
    assert np.all(np.isfinite(padded.hidden))


@pytest.mark.parametrize("chunk", [5, 8])
def test_chunked_cross_entropy_equals_the_full_one(model, chunk):
    """model.ce_chunk_size: 16 CE rows through lm_head `chunk` at a time (5: a padded last chunk) give the same
    per-row CE, loss and gradients as all rows at once; the logits are then not kept."""
    samples = [[vit(2, 2), txt(6, loss=True)], [txt(4), txt(7, loss=True)]]
    batch, latents, noise = build_packed_batch(samples, CFG, rng=1, **STATIC)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, chunk_size):
        m = nnx.merge(graphdef, params, rest)
        m.cfg.ce_chunk_size = chunk_size
        out = m(batch, latents, noise)
        return packed_loss(out, batch.ce_weight)[0], out

    try:
        grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
        (full, out_full), g_full = grad_fn(params, 0)
        (chunked, out_chunked), g_chunked = grad_fn(params, chunk)
    finally:
        model.cfg.ce_chunk_size = 0
    assert out_full.ce_logits.shape[1] == CFG.llm.vocab_size and out_chunked.ce_logits.shape[1] == 0
    np.testing.assert_allclose(out_chunked.ce, out_full.ce, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(chunked, full, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=max(1e-5 * float(np.abs(b).max()), 1e-9))
