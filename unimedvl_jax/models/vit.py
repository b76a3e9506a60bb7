"""SigLIP NaViT vision encoder (docs/model.md §1.2, docs/model.md §3.5, docs/model.md §3.6): linear patch embedding,
learned position table, pre-LN encoder layers with attention restricted to each image of the packed batch, tanh-GELU
MLP, post-layernorm."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from unimedvl_jax.models import remat
from unimedvl_jax.models.attention import packed_attention, segment_meta
from unimedvl_jax.models.layer_stack import apply_layers, stack_layers
from unimedvl_jax.models.layers import Embed, GeluMLP, LayerNorm, Linear, dtype_of, param_keys
from unimedvl_jax.sharding import RESIDUAL, constrain


class SiglipEmbeddings(nnx.Module):
    """PatchLinear(patch) + position_embedding[pid]; patches are (row, col, channel)-flattened (docs/model.md §3.5)."""

    def __init__(self, cfg, *, dtype, param_dtype, rngs):
        patch_dim = cfg.patch_size * cfg.patch_size * cfg.num_channels
        side = cfg.image_size // cfg.patch_size
        self.patch_embedding = Linear(patch_dim, cfg.hidden_size, axes=("vit_patch", "vit_embed"), dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)
        self.position_embedding = Embed(side * side, cfg.hidden_size, axes=("vit_pos", "vit_embed"),
                                        param_dtype=param_dtype, rngs=rngs)

    def __call__(self, patches, position_ids):
        x = self.patch_embedding(patches)
        return x + self.position_embedding(position_ids, x.dtype)


class SiglipAttention(nnx.Module):
    """Multi-head attention with biases, bidirectional within one image (varlen), no RoPE."""

    def __init__(self, cfg, *, dtype, param_dtype, rngs):
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, h // cfg.num_heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(h, h, axes=("vit_embed", "vit_heads"), save_name=remat.QUERY, **kw)
        self.k_proj = Linear(h, h, axes=("vit_embed", "vit_heads"), save_name=remat.KEY, **kw)
        self.v_proj = Linear(h, h, axes=("vit_embed", "vit_heads"), save_name=remat.VALUE, **kw)
        self.out_proj = Linear(h, h, axes=("vit_heads", "vit_embed"), save_name=remat.OUT_PROJ, **kw)

    def __call__(self, x, meta, *, backend, block_size):
        n = x.shape[0]
        q, k, v = (constrain(p(x).reshape(n, self.num_heads, self.head_dim), ("act_block_length", "act_heads", None))
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = packed_attention(q, k, v, meta, meta, backend=backend, block_size=block_size)
        return self.out_proj(remat.tag(out.reshape(n, self.num_heads * self.head_dim), remat.ATTENTION_OUT))


class SiglipEncoderLayer(nnx.Module):
    """Pre-LN block: x + attn(LN1(x)); x + mlp(LN2(x))."""

    def __init__(self, cfg, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, axis_name="vit_embed",
                                     param_dtype=param_dtype)
        self.self_attn = SiglipAttention(cfg, **kw)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, axis_name="vit_embed",
                                     param_dtype=param_dtype)
        self.mlp = GeluMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size, axes_in="vit_embed",
                           axes_hidden="vit_mlp", axes_out="vit_embed", act_hidden="act_mlp", **kw)

    def __call__(self, x, meta, *, backend, block_size):
        x = constrain(x, RESIDUAL)
        x = constrain(x + self.self_attn(self.layer_norm1(x), meta, backend=backend, block_size=block_size), RESIDUAL)
        return constrain(x + self.mlp(self.layer_norm2(x)), RESIDUAL)


class SiglipEncoder(nnx.Module):
    """Stack of encoder layers, looped or scanned (models/layer_stack.py)."""

    def __init__(self, cfg, *, dtype, param_dtype, scan_layers=False, rngs):
        layers = [SiglipEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                  for _ in range(cfg.num_layers)]
        self.layers = stack_layers(layers) if scan_layers else nnx.List(layers)


class SiglipVisionTransformer(nnx.Module):
    """Embeddings, encoder, post_layernorm (applied after the last instantiated layer, docs/quirks.md §9.15)."""

    def __init__(self, cfg, *, dtype, param_dtype, scan_layers=False, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = SiglipEmbeddings(cfg, **kw)
        self.encoder = SiglipEncoder(cfg, scan_layers=scan_layers, **kw)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, axis_name="vit_embed",
                                        param_dtype=param_dtype)


class SiglipVisionModel(nnx.Module):
    """SigLIP NaViT over a packed set of patches from several images."""

    def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, scan_layers=False, rngs: nnx.Rngs):
        self.dtype = dtype_of(dtype) or jnp.float32
        self.vision_model = SiglipVisionTransformer(cfg, dtype=self.dtype, param_dtype=param_dtype,
                                                    scan_layers=scan_layers, rngs=param_keys(rngs))

    def __call__(self, patches, position_ids, image_ids, *, backend="dense", block_size=512, remat_policy="none"):
        """patches (P, p*p*3), flattened position ids (P,), image id per patch (P,) -> features (P, hidden);
        remat_policy: a models/remat.py policy name applied to each encoder layer."""
        vm = self.vision_model
        meta = segment_meta(image_ids)
        x = vm.embeddings(patches.astype(self.dtype), position_ids)

        def run_layer(layer, x, _):
            return layer(x, meta, backend=backend, block_size=block_size), None

        x, _ = apply_layers(vm.encoder.layers, run_layer, x, remat_policy=remat_policy)
        return vm.post_layernorm(x)
