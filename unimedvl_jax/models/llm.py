"""Qwen2 language model with dense, MoE and Mixture-of-Transformers decoder layers (docs/model.md §1.1,
docs/model.md §1.5, docs/model.md §3.1–3.4).

Attribute names follow the official state dict (`self_attn.q_proj_moe_gen`, `mlp_moe_gen`, ...), so that the
interop name map is derived from module paths. `expert_indexes` is a list of token-index buffers, one per
expert (und first, gen second), or [None] when a single expert serves every token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unimedvl_jax.models import remat
from unimedvl_jax.models.attention import TokenMeta, packed_attention
from unimedvl_jax.models.layer_stack import apply_layers, stack_layers
from unimedvl_jax.models.layers import (
    Embed,
    Linear,
    RMSNorm,
    SwiGLU,
    apply_rope,
    dtype_of,
    normal_init,
    param_keys,
    rope_cos_sin,
)
from unimedvl_jax.models.routing import apply_experts, route, unroute
from unimedvl_jax.sharding import RESIDUAL, constrain

GEN_SUFFIX = "_moe_gen"


def expert_names(base: str, num_experts: int) -> list[str]:
    """Attribute names of a module's experts: ['q_proj'] or ['q_proj', 'q_proj_moe_gen']."""
    return [base, base + GEN_SUFFIX][:num_experts]


def _experts(module, base, num_experts):
    return [getattr(module, n) for n in expert_names(base, num_experts)]


class PackedAttention(nnx.Module):
    """GQA self-attention with q/k/v bias, optional per-head QK RMSNorm, RoPE after the norm (docs/model.md §3.2,
    docs/model.md §3.3)."""

    def __init__(self, cfg, num_experts: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.num_experts, self.qk_norm = num_experts, cfg.qk_norm
        kv = cfg.num_kv_heads * d
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for name in expert_names("q_proj", num_experts):
            setattr(self, name, Linear(h, h, axes=("embed", "q_heads"), save_name=remat.QUERY, **kw))
        for name in expert_names("k_proj", num_experts):
            setattr(self, name, Linear(h, kv, axes=("embed", "kv_heads"), save_name=remat.KEY, **kw))
        for name in expert_names("v_proj", num_experts):
            setattr(self, name, Linear(h, kv, axes=("embed", "kv_heads"), save_name=remat.VALUE, **kw))
        for name in expert_names("o_proj", num_experts):
            setattr(self, name, Linear(h, h, axes=("q_heads", "embed"), use_bias=False, save_name=remat.OUT_PROJ,
                                       **kw))
        if cfg.qk_norm:
            for base in ("q_norm", "k_norm"):
                for name in expert_names(base, num_experts):
                    setattr(self, name, RMSNorm(d, eps=cfg.rms_norm_eps, axis_name="head_dim",
                                                param_dtype=param_dtype))

    def project_qkv(self, e: int, x):
        """Expert e's (q, k, v) for tokens x (C, H), with QK-norm applied (before RoPE)."""
        n = x.shape[0]
        q = getattr(self, expert_names("q_proj", 2)[e])(x).reshape(n, self.num_heads, self.head_dim)
        k = getattr(self, expert_names("k_proj", 2)[e])(x).reshape(n, self.num_kv_heads, self.head_dim)
        v = getattr(self, expert_names("v_proj", 2)[e])(x).reshape(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = getattr(self, expert_names("q_norm", 2)[e])(q)
            k = getattr(self, expert_names("k_norm", 2)[e])(k)
        return q, k, v

    def __call__(self, x_normed_per_expert, expert_indexes, cos, sin, meta: TokenMeta, *, backend, block_size,
                 past=None):
        """Joint attention over all tokens; each token's projections come from its own expert.

        past: optional KV cache (keys (S, Hkv, D), values, meta over the S slots with these tokens' meta already at
        their slots, start) of this layer (post k-norm and RoPE, docs/inference.md §5.1): the new K/V are written at
        slots start … start + T - 1 and the tokens attend over the whole cache. Returns (per-expert outputs, (k, v) of
        the new tokens), or with `past` (per-expert outputs, the updated (keys, values)).
        """
        length = meta.length
        qkv = [self.project_qkv(e, xe) for e, xe in enumerate(x_normed_per_expert)]
        q, k, v = (unroute([t[i] for t in qkv], expert_indexes, length) for i in range(3))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = constrain(q, ("act_block_length", "act_heads", None))
        k, v = (constrain(t, ("act_block_length", "act_kv_heads", None)) for t in (k, v))
        if past is None:
            keys, values, key_meta = k, v, meta
        else:
            cache_k, cache_v, key_meta, start = past
            keys = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (start, 0, 0))
            values = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (start, 0, 0))
        out = packed_attention(q, keys.astype(q.dtype), values.astype(q.dtype), meta, key_meta, backend=backend,
                               block_size=block_size)
        out = remat.tag(out.reshape(length, self.num_heads * self.head_dim), remat.ATTENTION_OUT)
        outs = [o(t) for o, t in zip(_experts(self, "o_proj", self.num_experts), route(out, expert_indexes))]
        return outs, (keys, values)


class DecoderLayer(nnx.Module):
    """Qwen2DecoderLayer / Qwen2MoEDecoderLayer / Qwen2MoTDecoderLayer, selected by `layer_module`
    (docs/model.md §1.5)."""

    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.attn_experts = 2 if cfg.layer_module == "mot" else 1
        self.mlp_experts = 1 if cfg.layer_module == "dense" else 2
        self.self_attn = PackedAttention(cfg, self.attn_experts, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for name in expert_names("mlp", self.mlp_experts):
            setattr(self, name, SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype=dtype,
                                       param_dtype=param_dtype, rngs=rngs))
        for base in ("input_layernorm", "post_attention_layernorm"):
            for name in expert_names(base, self.attn_experts):
                setattr(self, name, RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed",
                                            param_dtype=param_dtype))

    def __call__(self, x, expert_indexes, cos, sin, meta, *, backend, block_size, past=None):
        """One residual block: h = x + attn(norm1(x)); out = h + mlp(norm2(h)), per token's expert (docs/model.md §3.4).

        Returns (out, (k, v) of these tokens); with `past` (this layer's cache, as PackedAttention) the k, v are
        written into it and (out, updated (keys, values)) is returned.
        """
        attn_indexes = expert_indexes if self.attn_experts == 2 else [None]
        mlp_indexes = expert_indexes if self.mlp_experts == 2 else [None]
        x = constrain(x, RESIDUAL)  # residual stream and expert token buffers: (act_length, act_embed)
        xs = [constrain(xe, RESIDUAL) for xe in route(x, attn_indexes)]
        normed = [n(xe) for n, xe in zip(_experts(self, "input_layernorm", self.attn_experts), xs)]
        attn, kv = self.self_attn(normed, attn_indexes, cos, sin, meta, backend=backend, block_size=block_size,
                                  past=past)
        h = constrain(unroute([xe + a for xe, a in zip(xs, attn)], attn_indexes, x.shape[0]), RESIDUAL)
        if self.attn_experts == self.mlp_experts:
            # MoT: norm2 and MLP use the same expert split as attention.
            hs = [constrain(he, RESIDUAL) for he in route(h, mlp_indexes)]
            outs = [he + mlp(n(he)) for he, n, mlp in zip(
                hs, _experts(self, "post_attention_layernorm", self.attn_experts),
                _experts(self, "mlp", self.mlp_experts))]
            return constrain(unroute(outs, mlp_indexes, x.shape[0]), RESIDUAL), kv
        # dense (1 expert everywhere) never reaches here; MoE: shared norm2, split MLP.
        z = self.post_attention_layernorm(h)
        mlps = _experts(self, "mlp", self.mlp_experts)
        return constrain(h + apply_experts(mlps, z, mlp_indexes, lambda mlp, t: mlp(t)), RESIDUAL), kv


class Qwen2Model(nnx.Module):
    """Embedding, decoder layers and the final norms (`norm` for und tokens, `norm_moe_gen` for gen tokens)."""

    def __init__(self, cfg, *, dtype, param_dtype, scan_layers=False, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), param_dtype=param_dtype,
                                  rngs=rngs)
        layers = [DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.num_layers)]
        # scan_layers: one module with a leading layer axis, run by jax.lax.scan (models/layer_stack.py)
        self.layers = stack_layers(layers) if scan_layers else nnx.List(layers)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed", param_dtype=param_dtype)
        self.num_final_norms = 1 if cfg.layer_module == "dense" else 2
        if self.num_final_norms == 2:
            self.norm_moe_gen = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed",
                                        param_dtype=param_dtype)


class Qwen2ForCausalLM(nnx.Module):
    """The packed Qwen2 LLM with untied `lm_head` (docs/model.md §1.1); decoder layers looped or scanned
    (`scan_layers`, models/layer_stack.py)."""

    def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, scan_layers=False, rngs: nnx.Rngs):
        self.dtype = dtype_of(dtype) or jnp.float32
        rngs = param_keys(rngs)
        self.model = Qwen2Model(cfg, dtype=self.dtype, param_dtype=param_dtype, scan_layers=scan_layers, rngs=rngs)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), use_bias=False,
                              dtype=self.dtype, param_dtype=param_dtype,
                              kernel_init=normal_init(0.02), rngs=rngs)
        self.cfg = cfg

    def embed(self, ids):
        """Token embeddings in the compute dtype."""
        return self.model.embed_tokens(ids, self.dtype)

    def __call__(self, embeds, position_ids, meta: TokenMeta, expert_indexes, *, backend="dense", block_size=512,
                 remat_policy="none", past=None):
        """Every decoder layer and the final norms on packed embeddings (T, H); past = None or a KV cache
        (keys, values, meta, start): keys / values per layer (S, Hkv, D) (indexed by layer: a stacked array or a
        sequence), meta over the S slots with these tokens' meta already at slots start … start + T - 1.
        remat_policy: a models/remat.py policy name applied to each decoder layer.

        Returns (hidden, per-layer residual outputs, per-layer (k, v) of the new tokens, post k-norm + RoPE); with
        `past` the last item is the per-layer (keys, values) with the new K/V written at their slots.
        """
        if self.cfg.layer_module == "dense":
            expert_indexes = [None]
        head_dim = self.cfg.hidden_size // self.cfg.num_heads
        cos, sin = rope_cos_sin(position_ids, head_dim, self.cfg.rope_theta, embeds.dtype)

        def run_layer(layer, x, layer_past):
            if layer_past is not None:
                layer_past = (*layer_past, past[2], past[3])
            x, kv = layer(x, expert_indexes, cos, sin, meta, backend=backend, block_size=block_size,
                          past=layer_past)
            return x, (x, kv)

        per_layer = None
        if past is not None:  # (keys, values) per layer: a list of pairs, or stacked arrays
            keys, values = past[0], past[1]
            per_layer = list(zip(keys, values)) if isinstance(keys, (list, tuple)) else (keys, values)
        x, outputs = apply_layers(self.model.layers, run_layer, embeds, per_layer, remat_policy=remat_policy)
        layer_outputs, kvs = [o[0] for o in outputs], [o[1] for o in outputs]
        norms = [self.model.norm, getattr(self.model, "norm_moe_gen", None)][:self.model.num_final_norms]
        final_indexes = expert_indexes if len(norms) == 2 else [None]
        hidden = apply_experts(norms, x, final_indexes, lambda norm, t: norm(t))
        return hidden, layer_outputs, kvs

    def logits(self, hidden):
        """lm_head projection of (already normed) hidden states, in fp32."""
        return self.lm_head(hidden).astype(jnp.float32)

