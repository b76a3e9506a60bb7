"""Top-level UniMedVL (BAGEL MoT): sequence assembly from a PackedBatch, the LLM, CE and flow-matching MSE
exactly as docs/model.md §3.11 and docs/packed_sequence.md §4.4–4.6 define them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from unimedvl_jax.config import remat_policy, validate_model_config
from unimedvl_jax.models.attention import TokenMeta
from unimedvl_jax.models.bridges import PositionEmbedding, TimestepEmbedder, patchify_latent_tokens, shift_timestep
from unimedvl_jax.models.layers import GeluMLP, Linear, constant_init, dtype_of, param_keys
from unimedvl_jax.models.llm import Qwen2ForCausalLM
from unimedvl_jax.models.vae import AutoEncoder
from unimedvl_jax.models.vit import SiglipVisionModel
from unimedvl_jax.packed_batch import TEXT, PackedBatch
from unimedvl_jax.sharding import RESIDUAL, constrain


@struct.dataclass
class ForwardOutput:
    """Per-token losses and the tensors the official code exposes (for parity and debugging)."""

    ce: jax.Array            # (C_ce,) per-position CE, 0 at padding slots
    ce_mask: jax.Array       # (C_ce,) bool
    ce_logits: jax.Array     # (C_ce, vocab) fp32; (C_ce, 0) under ce_chunk_size (not kept)
    mse: jax.Array           # (V,) mean over channels of (v̂ − (ε − x₀))², 0 where not a noised token
    mse_mask: jax.Array      # (V,) bool: real latent token with t > 0
    mse_preds: jax.Array     # (V, p·p·C) llm2vae predictions at every latent token
    x0: jax.Array            # (V, p·p·C) clean patchified latents
    x_t: jax.Array           # (V, p·p·C) noised inputs to vae2llm
    t: jax.Array             # (V,) shifted flow time
    input_embeds: jax.Array  # (T, H)
    hidden: jax.Array        # (T, H) after the final norms
    layer_outputs: tuple     # per-layer residual stream (only with return_layer_outputs)
    vit_features: jax.Array  # (P, vit_hidden) post-layernorm ViT output
    connector_out: jax.Array  # (P, H)
    time_embeds: jax.Array   # (V, H)


class UniMedVL(nnx.Module):
    """Bagel(language_model, vit_model, config) with the UniMedVL `vae_model` submodule (docs/model.md §1,
    docs/model.md §2.1)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        validate_model_config(cfg)
        self.cfg = cfg
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.dtype = dtype
        hidden = cfg.llm.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=param_keys(rngs))
        scan = bool(cfg.get("scan_layers", False))
        self.remat_policy = remat_policy(cfg)
        self.language_model = Qwen2ForCausalLM(cfg.llm, scan_layers=scan, **kw)
        self.vit_model = SiglipVisionModel(cfg.vit, scan_layers=scan, **kw)
        self.connector = GeluMLP(cfg.vit.hidden_size, hidden, hidden, axes_in="vit_embed", axes_hidden="embed_in",
                                 axes_out="embed", **kw)
        self.vit_pos_embed = PositionEmbedding(cfg.vit_max_num_patch_per_side, hidden, param_dtype=param_dtype)
        self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, hidden, param_dtype=param_dtype)
        self.time_embedder = TimestepEmbedder(hidden, **kw)
        self.patch_latent_dim = cfg.latent_patch_size ** 2 * cfg.vae.z_channels
        self.vae2llm = Linear(self.patch_latent_dim, hidden, axes=("latent", "embed"), **kw)
        # llm2vae is zero-initialised when training from scratch (docs/model.md §3.11).
        self.llm2vae = Linear(hidden, self.patch_latent_dim, axes=("embed", "latent"),
                              kernel_init=constant_init(0.0), bias_init=constant_init(0.0), **kw)
        self.vae_model = AutoEncoder(cfg.vae, images_per_call=int(cfg.get("vae_images_per_call", 0)), **kw)

    def cross_entropy(self, h_ce, labels):
        """(CE per row, fp32 logits) of the CE rows; with `ce_chunk_size` > 0 the rows go through lm_head that
        many at a time, each chunk's logits recomputed in the backward instead of kept, and the logits are not
        returned (an empty (rows, 0) array): the (rows, vocab) fp32 logits of a 14B pack are several GiB
        (docs/memory.md)."""
        lm, chunk = self.language_model, int(self.cfg.get("ce_chunk_size", 0))
        rows = h_ce.shape[0]
        if chunk <= 0 or rows <= chunk:
            return _token_ce(lm, h_ce, labels)
        pad = -rows % chunk
        h = jnp.pad(h_ce, ((0, pad), (0, 0))).reshape(-1, chunk, h_ce.shape[-1])
        y = jnp.pad(labels, (0, pad)).reshape(-1, chunk)
        one_chunk = jax.checkpoint(lambda hy: _token_ce(lm, *hy)[0], policy=jax.checkpoint_policies.nothing_saveable)
        ce = jax.lax.map(one_chunk, (h, y)).reshape(-1)[:rows]
        return ce, jnp.zeros((rows, 0), jnp.float32)

    # --- sequence assembly (docs/packed_sequence.md §4.4) -------------------------------------------------------------
    def embed_vit(self, batch: PackedBatch):
        """ViT features, connector output and LLM embeddings (connector + sin-cos table) of every patch."""
        return self.vit_embeddings(batch.vit_patches, batch.vit_position_ids, batch.vit_image_id)

    def vit_embeddings(self, patches, position_ids, image_ids):
        """(ViT features, connector output, connector + vit_pos_embed[pid]) of packed patches (docs/model.md §3.5,
        docs/model.md §3.8)."""
        c = self.cfg
        if patches.shape[0] == 0:  # no ViT image in this pack (static shape)
            empty = jnp.zeros((0, c.llm.hidden_size), self.dtype)
            return jnp.zeros((0, c.vit.hidden_size), self.dtype), empty, empty
        feats = self.vit_model(patches, position_ids, image_ids, backend=c.attention_backend,
                               block_size=c.attention_block_size, remat_policy=self.remat_policy)
        conn = self.connector(feats)
        return feats, conn, conn + self.vit_pos_embed(position_ids, conn.dtype)

    def embed_latents(self, batch: PackedBatch, latents, flow_noise):
        """x₀, t, x_t and the LLM embedding vae2llm(x_t) + temb(t) + latent_pos (docs/model.md §3.10,
        docs/model.md §3.11)."""
        x0 = patchify_latent_tokens(jnp.asarray(latents, jnp.float32), batch.vae_token_image, batch.vae_token_row,
                                    batch.vae_token_col, self.cfg.latent_patch_size)
        t = shift_timestep(jax.nn.sigmoid(batch.vae_timestep.astype(jnp.float32)), self.cfg.timestep_shift)
        x_t = (1.0 - t[:, None]) * x0 + t[:, None] * flow_noise.astype(jnp.float32)
        embeds, temb = self.latent_token_embeds(x_t, t, batch.vae_position_ids)
        return x0, t, x_t, temb, embeds

    def latent_token_embeds(self, x_t, t, position_ids):
        """(vae2llm(x_t) + temb(t) + latent_pos_embed[pid], temb) of latent tokens at flow times t
        (docs/model.md §3.10).

        The one embedding of latent tokens: training (per-token t), clean conditioning images (t = 0) and the
        sampler's flow query (one t for the image) all go through it."""
        temb = self.time_embedder(t)
        embeds = self.vae2llm(x_t.astype(self.dtype)) + temb + self.latent_pos_embed(position_ids, self.dtype)
        return embeds, temb

    def __call__(self, batch: PackedBatch, latents, flow_noise, *, return_layer_outputs=False) -> ForwardOutput:
        """Training forward: latents (N, Hl, Wl, C) normalised VAE latents, flow_noise (V, p·p·C) = ε."""
        c = self.cfg
        length = batch.num_tokens
        text = self.language_model.embed(batch.text_ids)
        embeds = jnp.where((batch.token_kind == TEXT)[:, None], text, jnp.zeros_like(text))
        feats, conn, vit_embeds = self.embed_vit(batch)
        embeds = embeds.at[batch.vit_token_index].set(vit_embeds.astype(embeds.dtype), mode="drop")
        x0, t, x_t, temb, vae_embeds = self.embed_latents(batch, latents, flow_noise)
        embeds = constrain(embeds.at[batch.vae_token_index].set(vae_embeds.astype(embeds.dtype), mode="drop"),
                           RESIDUAL)

        meta = TokenMeta(batch.sample_id, batch.split_id, batch.split_mode,
                         jnp.arange(length, dtype=jnp.int32))
        hidden, layer_outputs, _ = self.language_model(
            embeds, batch.position_ids, meta, [batch.und_index, batch.gen_index],
            backend=c.attention_backend, block_size=c.attention_block_size, remat_policy=self.remat_policy)

        # CE at the requested positions (docs/packed_sequence.md §4.6); padding slots (index T) are masked.
        ce_mask = batch.ce_index < length
        h_ce = jnp.take(hidden, batch.ce_index, axis=0, mode="fill", fill_value=0)
        ce, logits = self.cross_entropy(h_ce, batch.ce_labels.astype(jnp.int32))
        ce = jnp.where(ce_mask, ce, 0.0)

        # Flow-matching MSE at noised latent tokens only (t > 0), target ε − x₀ (docs/model.md §3.11).
        h_vae = jnp.take(hidden, batch.vae_token_index, axis=0, mode="fill", fill_value=0)
        preds = self.llm2vae(h_vae).astype(jnp.float32)
        mse_mask = (batch.vae_token_index < length) & (t > 0)
        target = flow_noise.astype(jnp.float32) - x0
        mse = jnp.where(mse_mask, jnp.mean(jnp.square(preds - target), axis=-1), 0.0)

        return ForwardOutput(
            ce=ce, ce_mask=ce_mask, ce_logits=logits, mse=mse, mse_mask=mse_mask, mse_preds=preds, x0=x0,
            x_t=x_t, t=t, input_embeds=embeds, hidden=hidden,
            layer_outputs=tuple(layer_outputs) if return_layer_outputs else (),
            vit_features=feats, connector_out=conn, time_embeds=temb)


def _token_ce(lm, h, labels):
    """(per-row CE, fp32 logits) of hidden rows h against integer labels."""
    logits = constrain(lm.logits(h), ("act_block_length", "act_vocab"))
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - label_logit, logits


def loss_counts(batch: PackedBatch):
    """(N_ce, N_mse): the CE positions and noised latent tokens of a (global) batch, known before the forward."""
    length = batch.text_ids.shape[-1]
    n_ce = jnp.sum(batch.ce_index < length)
    n_mse = jnp.sum((batch.vae_token_index < length) & (batch.vae_timestep > -jnp.inf))
    return n_ce, n_mse


def packed_loss(out: ForwardOutput, ce_weight, *, counts=None, ce_loss_weight=1.0, mse_loss_weight=1.0):
    """loss = w_ce·Σce·w/N_ce + w_mse·Σmse/N_mse (docs/packed_sequence.md §4.6); a term with no tokens contributes 0.

    `counts` = (N_ce, N_mse) to normalise by; by default this output's own. The train step passes the global
    batch's counts (loss_counts) for each pack and sums the packs' shares, which is the all-reduced
    normalisation of docs/packed_sequence.md §4.6. Returns (loss, dict of the terms).
    """
    n_ce, n_mse = (jnp.sum(out.ce_mask), jnp.sum(out.mse_mask)) if counts is None else counts
    ce = jnp.sum(out.ce * ce_weight) / jnp.maximum(n_ce, 1)
    mse = jnp.sum(out.mse) / jnp.maximum(n_mse, 1)
    loss = ce_loss_weight * ce + mse_loss_weight * mse
    return loss, {"ce": ce, "mse": mse, "n_ce": n_ce, "n_mse": n_mse}
