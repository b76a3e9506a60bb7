"""A generation context (docs/inference.md §5.1): cached text / ViT-image segments with host-side kv_len and rope
bookkeeping, and greedy / temperature text generation (docs/inference.md §5.2) as used by Bagel.chat for VQA
(docs/inference.md §5.4)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from unimedvl_jax.inference.decoding import decode
from unimedvl_jax.inference.image_tokens import encode_image_tokens, image_token_embeds, latent_position_ids
from unimedvl_jax.inference.kv_cache import KVCache, ModelStructure, append, bucket, empty_cache, split_model
from unimedvl_jax.packed_batch import CAUSAL, FULL, TEXT, VIT
from unimedvl_jax.patches import flattened_position_ids


@functools.partial(jax.jit, static_argnums=0)
def _vit_tokens(structure: ModelStructure, params, patches, position_ids, image_ids):
    """LLM embeddings (connector + position table) of ViT patches, jitted over the split model."""
    return structure.merge(params).vit_embeddings(patches, position_ids, image_ids)[2]


@dataclasses.dataclass
class Context:
    """KV cache + rope of one conversation (batch size 1); methods return new contexts (the cache is immutable)."""

    model: object
    cache: KVCache
    kv_len: int = 0
    rope: int = 0

    @classmethod
    def new(cls, model, max_len: int) -> "Context":
        """An empty context with room for max_len tokens."""
        return cls(model, empty_cache(model.cfg.llm, max_len, model.dtype))

    def _append(self, embeds, kinds, positions, mode, *, rope_after: int, advance: bool = True):
        n = embeds.shape[0]
        if self.kv_len + n > self.cache.max_len:
            raise ValueError(f"context overflow: {self.kv_len} cached + {n} new tokens > max_len "
                             f"{self.cache.max_len}")
        # The padded chunk is written whole, and a write running past the cache end would be shifted back over
        # cached slots (dynamic_update_slice clamps), so near the end the chunk is padded only to the end.
        size = min(bucket(n), self.cache.max_len - self.kv_len)
        pad = size - n
        embeds = jnp.concatenate([embeds, jnp.zeros((pad, embeds.shape[1]), embeds.dtype)])
        kinds = np.concatenate([np.asarray(kinds, np.int32), np.full(pad, TEXT, np.int32)])
        positions = np.concatenate([np.asarray(positions, np.int32), np.zeros(pad, np.int32)])
        cache, hidden = append(self.model, self.cache, embeds, kinds, jnp.asarray(positions),
                               jnp.int32(mode), jnp.int32(n), advance_cache=advance)
        new = dataclasses.replace(self, cache=cache, kv_len=self.kv_len + (n if advance else 0), rope=rope_after)
        return new, hidden[:n]

    def add_text(self, ids) -> "Context":
        """[<|im_start|>] + ids + [<|im_end|>], causal, positions rope … rope+L+1 (docs/packed_sequence.md §4.2,
        docs/inference.md §5.1)."""
        st = self.model.cfg.special_tokens
        tokens = np.asarray([st.bos_token_id, *ids, st.eos_token_id], np.int32)
        embeds = self.model.language_model.embed(jnp.asarray(tokens))
        positions = self.rope + np.arange(len(tokens))
        return self._append(embeds, np.full(len(tokens), TEXT), positions, CAUSAL,
                            rope_after=self.rope + len(tokens))[0]

    def add_vit_image(self, patches, grid_hw) -> "Context":
        """[<|vision_start|>] + ViT tokens + [<|vision_end|>], full attention, all at one rope id
        (docs/inference.md §5.1)."""
        st, side = self.model.cfg.special_tokens, self.model.cfg.vit_max_num_patch_per_side
        h, w = grid_hw
        n = h * w
        # Padded to a bucket as a second image (its own attention segment), so image sizes share compiled ViTs.
        pad = bucket(n) - n
        patches = np.concatenate([np.asarray(patches, np.float32), np.zeros((pad, np.shape(patches)[1]), np.float32)])
        pos_ids = np.concatenate([flattened_position_ids(h, w, side), np.zeros(pad, np.int32)]).astype(np.int32)
        structure, params = split_model(self.model, self.model)
        vit = _vit_tokens(structure, params, patches, pos_ids, (np.arange(n + pad) >= n).astype(np.int32))[:n]
        markers = self.model.language_model.embed(jnp.asarray([st.start_of_image, st.end_of_image]))
        embeds = jnp.concatenate([markers[:1], vit.astype(markers.dtype), markers[1:]])
        kinds = np.concatenate([[TEXT], np.full(h * w, VIT), [TEXT]])
        return self._append(embeds, kinds, np.full(h * w + 2, self.rope), FULL, rope_after=self.rope + 1)[0]

    def add_vae_image(self, pixels, *, eps=None, key=None) -> "Context":
        """[<|vision_start|>] + clean VAE latents (t = 0) + [<|vision_end|>], full attention, one rope id
        (docs/inference.md §5.1).

        pixels: (H, W, 3) in [-1, 1]. The VAE posterior is sampled (docs/quirks.md §9.1) with noise `eps`
        (1, H/f, W/f, C) or drawn from the PRNG `key`. Markers use the und expert, latents the gen expert; rope advances
        by one.
        """
        tokens, grid = encode_image_tokens(self.model, pixels, eps=eps, key=key)
        embeds, kinds = image_token_embeds(self.model, tokens, 0.0, latent_position_ids(self.model, grid))
        return self._append(embeds, kinds, np.full(len(kinds), self.rope), FULL, rope_after=self.rope + 1)[0]

    def generate_text(self, max_length: int, *, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
        """docs/inference.md §5.2: feed <|im_start|>, then greedy (temperature 0) or sampled tokens until <|im_end|> is
        predicted or max_length steps (the start token counts as step 1). Returns (token ids incl. the start token,
        per-step logits (steps, vocab)). The context itself is unchanged (gen_text works on a copy)."""
        out = decode([self], max_length, temperature=temperature, top_p=top_p, seed=seed, return_logits=True)
        return out.ids[0], out.logits[0]
