"""Latent image segments in the LLM sequence (docs/model.md §3.10, docs/inference.md §5.1): [<|vision_start|>] + h·w
latent tokens + [<|vision_end|>], markers on the und expert and latents on the gen expert, each latent embedded as
vae2llm(x) + temb(t) + latent_pos_embed[pid]. Shared by clean conditioning images and the flow query."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from unimedvl_jax.inference.kv_cache import ModelStructure, split_model
from unimedvl_jax.packed_batch import TEXT, VAE
from unimedvl_jax.patches import flattened_position_ids, patchify_latent


def latent_downsample(model) -> int:
    """Pixels per latent token side: VAE downsample × latent patch size (16 released)."""
    return model.cfg.vae.downsample * model.cfg.latent_patch_size


def latent_grid(model, image_shape, *, what: str = "image_shape") -> tuple[int, int]:
    """Token grid (h, w) of an (H, W) pixel size; H and W must be multiples of the latent downsample."""
    try:
        height, width = (int(v) for v in image_shape)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected an (H, W) pair of ints, got {image_shape!r}") from None
    f = latent_downsample(model)
    if height <= 0 or width <= 0 or height % f or width % f:
        raise ValueError(f"{what}={(height, width)}: H and W must be positive multiples of {f} "
                         f"(VAE downsample × latent patch size)")
    h, w = height // f, width // f
    side = model.cfg.max_latent_size
    if h > side or w > side:
        raise ValueError(f"{what}={(height, width)}: latent grid {h}x{w} exceeds the {side}x{side} latent "
                         f"position table (max_latent_size)")
    return h, w


def latent_position_ids(model, grid_hw) -> np.ndarray:
    """Flattened 2-D ids r·max_latent_size + c of an h×w latent grid (docs/model.md §3.6 'extrapolate')."""
    return flattened_position_ids(*grid_hw, model.cfg.max_latent_size)


@functools.partial(jax.jit, static_argnums=0)
def _segment_embeds(structure: ModelStructure, params, x_tokens, t, position_ids):
    """[start] + latent embeddings + [end] over the split model (also callable inside a trace: jit nests)."""
    model = structure.merge(params)
    st = model.cfg.special_tokens
    latents, _ = model.latent_token_embeds(x_tokens, jnp.full((x_tokens.shape[0],), t, jnp.float32), position_ids)
    markers = model.language_model.embed(jnp.asarray([st.start_of_image, st.end_of_image], jnp.int32))
    return jnp.concatenate([markers[:1], latents.astype(markers.dtype), markers[1:]])


def image_token_embeds(model, x_tokens, t, position_ids):
    """(embeds, kinds) of [start] + latents + [end]; latents = vae2llm(x) + temb(t) + latent_pos_embed
    (docs/model.md §3.10)."""
    n = x_tokens.shape[0]
    embeds = _segment_embeds(*split_model(model, model), x_tokens, jnp.asarray(t, jnp.float32),
                             jnp.asarray(position_ids, jnp.int32))
    return embeds, np.concatenate([[TEXT], np.full(n, VAE), [TEXT]]).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _encode(structure: ModelStructure, params, pixels, eps):
    """VAE encode with the given posterior noise over the split autoencoder."""
    return structure.merge(params).encode(pixels, eps=eps)


def encode_image_tokens(model, pixels, *, eps=None, key=None):
    """VAE-encode one image (H, W, 3) in [-1, 1] to clean latent tokens (h·w, p·p·C) and its grid (h, w).

    The posterior is *sampled* (z = mean + σ·eps), as the official inference does (docs/model.md §3.10,
    docs/quirks.md §9.1): pass the posterior noise `eps` (1, H/f, W/f, z_channels) or a PRNG `key` to draw it.
    """
    pixels = jnp.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"pixels: expected (H, W, 3) in [-1, 1], got shape {tuple(pixels.shape)}")
    grid = latent_grid(model, pixels.shape[:2], what="pixels (H, W)")
    f = model.cfg.vae.downsample
    eps_shape = (1, pixels.shape[0] // f, pixels.shape[1] // f, model.cfg.vae.z_channels)
    if eps is None:
        if key is None:
            raise ValueError("encode_image_tokens: pass the posterior noise `eps` or a PRNG `key` (the VAE "
                             "posterior is sampled, docs/quirks.md §9.1)")
        eps = jax.random.normal(key, eps_shape, jnp.float32)
    elif tuple(np.shape(eps)) != eps_shape:
        raise ValueError(f"eps: expected shape {eps_shape} (NHWC), got {tuple(np.shape(eps))}")
    latent = _encode(*split_model(model, model.vae_model), pixels[None].astype(model.dtype),
                     jnp.asarray(eps, jnp.float32))
    return patchify_latent(latent[0], model.cfg.latent_patch_size), grid
