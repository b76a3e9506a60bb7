"""Image generation from prefilled contexts (docs/inference.md §5.3 `generate_image`): the noisy-latent query against
the conditional and the two unconditional KV caches, classifier-free guidance, the Euler sampler and VAE decoding.

The query is [<|vision_start|>] + h·w noisy latents + [<|vision_end|>] at each context's current rope id, full
attention, markers on the und expert and latents on the gen expert; it never updates a cache (docs/inference.md §5.1).
Every branch's velocity and the guidance are one batched computation, and the Euler steps run inside one jitted
loop per stretch of steps with the same guidance scales (at most three: before, inside and after cfg_interval), over
the model split once (kv_cache.split_model): the loop compiles once per image size, branch set (1, 2 or 3 contexts)
and block of TIMESTEP_BLOCK step counts, and no step costs a dispatch or a graph traversal. `guided_velocity` is the
same velocity as a per-step call.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimedvl_jax.inference.flow_sampler import euler_loop, flow_timesteps
from unimedvl_jax.inference.guidance import check_guidance, guidance_branches, guidance_scales, guide_velocity
from unimedvl_jax.inference.image_tokens import image_token_embeds, latent_grid, latent_position_ids
from unimedvl_jax.inference.kv_cache import KVCache, ModelStructure, append_chunk, empty_cache, split_model
from unimedvl_jax.inference.precision import rounding_to
from unimedvl_jax.packed_batch import FULL
from unimedvl_jax.patches import unpatchify_latent

TIMESTEP_BLOCK = 64  # the schedule is padded to a multiple of this: 25 and 50 steps share the compiled loops


class GuidanceContexts(NamedTuple):
    """The conditional context and the text- / image-unconditional ones (None where never needed)."""

    cond: object
    text_uncond: object = None
    img_uncond: object = None


@dataclasses.dataclass(frozen=True)
class FlowStep:
    """One Euler step: time, effective scales, input latent, guided velocity and the raw branch velocities."""

    t: float
    cfg_text_scale: float
    cfg_img_scale: float
    x_t: np.ndarray
    v_t: np.ndarray
    raw: tuple


def _velocity(model, x, t, position_ids, caches, ropes, text_scale, img_scale, renorm_min, *, branches,
              renorm_type):
    """(guided velocity, raw velocities (branches, h·w, p·p·C)): the query of every branch as one vmapped forward."""
    embeds, kinds = image_token_embeds(model, x, t, position_ids)
    n = embeds.shape[0]

    def branch(cache, rope):
        _, hidden = append_chunk(model, cache, embeds, kinds, jnp.full((n,), rope, jnp.int32),
                                 FULL, n, advance_cache=False)
        return model.llm2vae(hidden[1:-1])

    raw = jax.vmap(branch)(jax.tree.map(lambda a: a[:branches], caches), ropes[:branches])
    return guide_velocity(*raw, text_scale=text_scale, img_scale=img_scale, renorm_type=renorm_type,
                          renorm_min=renorm_min), raw


@functools.partial(nnx.jit, static_argnames=("branches", "renorm_type"))
def guided_velocity(model, x, t, position_ids, caches, ropes, text_scale, img_scale, renorm_min, *, branches,
                    renorm_type):
    """(guided velocity, raw velocities (branches, h·w, p·p·C)) at (x, t), from the first `branches` entries of
    stacked caches / ropes: cond, text-uncond, image-uncond.

    Every branch sees the same query embeddings; only the cache and the rope id differ (docs/inference.md §5.3
    'Velocity'). The branches run as one batched forward.
    """
    return _velocity(model, x, t, position_ids, caches, ropes, text_scale, img_scale, renorm_min, branches=branches,
                     renorm_type=renorm_type)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("branches", "renorm_type", "record"))
def _euler_stretch(structure: ModelStructure, params, x, timesteps, start, stop, position_ids, caches, ropes,
                   text_scale, img_scale, renorm_min, *, branches, renorm_type, record):
    """Euler steps start … stop − 1 with fixed guidance scales, as one loop (flow_sampler.euler_loop)."""
    model = structure.merge(params)

    def velocity(x_t, t):
        return _velocity(model, x_t, t, position_ids, caches, ropes, text_scale, img_scale, renorm_min,
                         branches=branches, renorm_type=renorm_type)

    return euler_loop(velocity, x, timesteps, start, stop, record=record)


def _pad_cache(cache: KVCache, max_len: int, llm_cfg) -> KVCache:
    """The cache with empty slots (invisible to every query) appended up to max_len."""
    if cache.max_len == max_len:
        return cache
    empty = empty_cache(llm_cfg, max_len - cache.max_len, cache.keys.dtype)
    slots = lambda a, b: jnp.concatenate([a, b], axis=1)
    meta = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cache.meta, empty.meta)
    return KVCache(slots(cache.keys, empty.keys), slots(cache.values, empty.values), meta, cache.length,
                   cache.next_split)


def stack_caches(contexts):
    """(caches stacked on a leading axis, padded to the longest, ropes (B,) int32) of the branch contexts."""
    max_len = max(c.cache.max_len for c in contexts)
    caches = [_pad_cache(c.cache, max_len, c.model.cfg.llm) for c in contexts]
    return (jax.tree.map(lambda *leaves: jnp.stack(leaves), *caches),
            jnp.asarray([c.rope for c in contexts], jnp.int32))


def initial_noise(model, image_shape, *, seed: int = 0, init_noise=None):
    """x ~ N(0, I) of shape (h·w, p·p·C) in float32 from `seed`, or the given `init_noise` (checked)."""
    h, w = latent_grid(model, image_shape)
    shape = (h * w, model.patch_latent_dim)
    if init_noise is None:
        return jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    if tuple(np.shape(init_noise)) != shape:
        raise ValueError(f"init_noise: expected shape {shape} for image_shape {tuple(image_shape)}, got "
                         f"{tuple(np.shape(init_noise))}")
    return jnp.asarray(init_noise, jnp.float32)


def _branch_contexts(model, contexts, branches_needed, cfg_text_scale, cfg_img_scale):
    """The contexts the sampler needs (cond first), checked against the guidance settings and the model."""
    contexts = GuidanceContexts(*contexts)
    if contexts.cond is None:
        raise ValueError("contexts[0] (the conditional context) is required")
    for i, ctx in enumerate(contexts[:branches_needed]):
        if ctx is not None and ctx.model is not model:
            raise ValueError(f"contexts[{i}] was built with another model instance")
    if branches_needed >= 2 and contexts.text_uncond is None:
        raise ValueError(f"cfg_text_scale={cfg_text_scale} > 1 inside cfg_interval needs a text-unconditional "
                         f"context (contexts[1])")
    if branches_needed >= 3 and contexts.img_uncond is None:
        raise ValueError(f"cfg_img_scale={cfg_img_scale} > 1 inside cfg_interval needs an image-unconditional "
                         f"context (contexts[2])")
    return list(contexts[:branches_needed])


def generate_image(model, contexts, image_shape, *, num_timesteps=50, timestep_shift=3.0, cfg_text_scale=4.0,
                   cfg_img_scale=1.5, cfg_interval=(0.4, 1.0), cfg_renorm_min=0.0, cfg_renorm_type="global",
                   seed: int = 0, init_noise=None, return_trace: bool = False):
    """Sample latents (h·w, p·p·C) float32 for an (H, W) image by guided flow matching (docs/inference.md §5.3).

    contexts: (cond, text_uncond, img_uncond) Contexts; the unconditional ones may be None when their scale
    is ≤ 1. init_noise (h·w, p·p·C) overrides the noise drawn from `seed`. With return_trace, also returns a
    list of FlowStep (one per Euler step). Defaults are the official `gen_image` ones (docs/inference.md §5.5).
    """
    check_guidance(cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_min, cfg_renorm_type)
    timesteps = flow_timesteps(num_timesteps, timestep_shift)
    scales = [guidance_scales(t, cfg_interval, cfg_text_scale, cfg_img_scale) for t in timesteps[:-1]]
    branch_ctx = _branch_contexts(model, contexts, max(guidance_branches(*s) for s in scales), cfg_text_scale,
                                  cfg_img_scale)
    x = initial_noise(model, image_shape, seed=seed, init_noise=init_noise)
    position_ids = jnp.asarray(latent_position_ids(model, latent_grid(model, image_shape)), jnp.int32)
    caches, ropes = stack_caches(branch_ctx)
    structure, params = split_model(model, model)
    padded = np.pad(timesteps, (0, -len(timesteps) % TIMESTEP_BLOCK), mode="edge")
    trace, start = [], 0
    # The interval is compared on the monotone t, so equal scales come in at most three consecutive stretches.
    for (text_scale, img_scale), stretch in itertools.groupby(scales):
        stop = start + len(list(stretch))
        out = _euler_stretch(structure, params, x, padded, np.int32(start), np.int32(stop), position_ids, caches,
                             ropes, np.float32(text_scale), np.float32(img_scale), np.float32(cfg_renorm_min),
                             branches=guidance_branches(text_scale, img_scale), renorm_type=cfg_renorm_type,
                             record=return_trace)
        if return_trace:
            x, (xs, vs, raws) = out
            xs, vs, raws = (np.asarray(a[start:stop]) for a in (xs, vs, raws))
            trace += [FlowStep(float(timesteps[i]), text_scale, img_scale, xs[i - start], vs[i - start],
                               tuple(raws[i - start])) for i in range(start, stop)]
        else:
            x = out
        start = stop
    return (x, trace) if return_trace else x


@functools.partial(jax.jit, static_argnums=0)
def _decode(structure: ModelStructure, params, latent):
    """VAE decode over the split autoencoder."""
    return structure.merge(params).decode(latent)


def to_uint8(image):
    """clamp(x·0.5 + 0.5, 0, 1)·255 rounded per op to the image's dtype, then a truncating uint8 cast
    (docs/inference.md §5.3, docs/quirks.md §9.11; a bf16 decoder output is rounded to bf16 before the cast,
    docs/quirks.md §10.2)."""
    rnd = rounding_to(image.dtype)
    x = jnp.asarray(image).astype(jnp.float32)
    return rnd(jnp.clip(rnd(x * 0.5 + 0.5), 0.0, 1.0) * 255.0).astype(jnp.uint8)


def decode_latents(model, latents, image_shape, *, return_float: bool = False):
    """uint8 (H, W, 3) image of latent tokens (h·w, p·p·C): unpatchify, VAE decode, [-1, 1] → uint8.

    With return_float, also returns the decoder output (H, W, 3) before the conversion.
    """
    h, w = latent_grid(model, image_shape)
    p, c = model.cfg.latent_patch_size, model.cfg.vae.z_channels
    if tuple(np.shape(latents)) != (h * w, p * p * c):
        raise ValueError(f"latents: expected shape {(h * w, p * p * c)} for image_shape {tuple(image_shape)}, got "
                         f"{tuple(np.shape(latents))}")
    spatial = unpatchify_latent(jnp.asarray(latents, jnp.float32), h, w, p, c)
    decoded = _decode(*split_model(model, model.vae_model), spatial[None])[0]
    image = np.asarray(to_uint8(decoded))
    return (image, np.asarray(decoded, np.float32)) if return_float else image
