"""Interleaved inputs → the three generation contexts, as the official `InterleaveInferencer` builds them
(docs/inference.md §5.3 'Unconditional contexts', 'Think mode'), and the text→image / editing entry points on top of
them.

Rules (inputs processed in order):
- the conditional context gets everything;
- the text-unconditional context is the conditional one as it was *before* the latest text item, or *after*
  the latest image item;
- the image-unconditional context gets only the text items (and the think system prompt).
In generation mode an input image is first resized with the VAE transform's rule, then added as a clean VAE
image followed by its ViT form (the ViT transform resizes that resized image again); the generated image takes
the size of the last input image. In understanding mode images go in through the ViT only.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from PIL import Image

from data_pipelines.transforms import ImageTransform, patchify_vit, to_normalized_array
from unimedvl_jax.inference.context import Context
from unimedvl_jax.inference.image_generation import GuidanceContexts, decode_latents, generate_image
from unimedvl_jax.inference.image_tokens import latent_downsample
from unimedvl_jax.inference.kv_cache import bucket

# docs/inference.md §5.3 'Think mode' system prompts.
VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer.\n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> "
    "answer here")
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in your mind, and then generate the image.\n"
    "The planning process is enclosed within <think> </think> tags; that is, <think> planning process here "
    "</think> image here.\n")

# docs/inference.md §5.5 defaults: `interleave_inference` for text→image, the UniMedVL image generator's editing demo
# for editing.
T2I_DEFAULTS = dict(num_timesteps=50, timestep_shift=3.0, cfg_text_scale=3.0, cfg_img_scale=1.5,
                    cfg_interval=(0.4, 1.0), cfg_renorm_min=0.0, cfg_renorm_type="global")
EDIT_DEFAULTS = dict(num_timesteps=50, timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=2.0,
                     cfg_interval=(0.0, 1.0), cfg_renorm_min=0.0, cfg_renorm_type="text_channel")
# UniMedVL image generator transforms (docs/inference.md §5.5): VAE (1024, 32, 16), ViT (980, 387, 14), max_pixels
# 1,806,336.
GEN_VAE_TRANSFORM = ImageTransform(1024, 32, 16)
GEN_VIT_TRANSFORM = ImageTransform(980, 387, 14)
EDIT_UNDERSTAND_MAX_TOKENS = 800
THINK_MAX_TOKENS = 1000
CACHE_GRANULE = 128


@dataclasses.dataclass(frozen=True)
class PreparedImage:
    """An input image after the VAE resize rule: VAE pixels (H, W, 3) in [-1, 1] and its ViT patches."""

    vae_pixels: np.ndarray
    vit_patches: np.ndarray
    vit_grid: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return self.vae_pixels.shape[:2]


@dataclasses.dataclass(frozen=True)
class GeneratedImage:
    """uint8 (H, W, 3) image, its latent tokens (h·w, p·p·C) and any text generated first (think/understand)."""

    image: np.ndarray
    latents: np.ndarray
    text: str | None = None


def prepare_image(model, image, vae_transform: ImageTransform, vit_transform: ImageTransform) -> PreparedImage:
    """Resize with the VAE rule, then take the VAE pixels and the ViT patches of that resized image
    (docs/inference.md §5.3)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"image inputs must be PIL images or uint8 (H, W, 3) arrays, got {type(image).__name__}")
    resized = vae_transform.resize(image)
    vit_pixels = vit_transform(resized)
    patch = model.cfg.vit.patch_size
    return PreparedImage(to_normalized_array(resized), patchify_vit(vit_pixels, patch),
                         (vit_pixels.shape[0] // patch, vit_pixels.shape[1] // patch))


def _segment_lengths(model, items, system_ids, generation):
    """Token count of every segment the conditional context receives (to size the caches)."""
    lengths = [len(system_ids) + 2] if system_ids is not None else []
    f = latent_downsample(model)
    for item in items:
        if isinstance(item, PreparedImage):
            h, w = item.shape
            if generation:
                lengths.append((h // f) * (w // f) + 2)
            lengths.append(len(item.vit_patches) + 2)
        else:
            lengths.append(len(item) + 2)
    return lengths


def build_contexts(model, tokenizer, inputs: Sequence, *, generation: bool = True, think: bool = False,
                   vae_transform: ImageTransform = GEN_VAE_TRANSFORM,
                   vit_transform: ImageTransform = GEN_VIT_TRANSFORM, key=None, vae_eps=None,
                   extra_tokens: int = 0):
    """(GuidanceContexts, image shape of the last input image or None) for interleaved str / image inputs.

    key: PRNG key for the VAE posterior draws (docs/quirks.md §9.1), or vae_eps: one recorded posterior noise per image.
    think: add the think system prompt first (docs/inference.md §5.3). extra_tokens: room to leave for later text
    (think).
    """
    images = [x for x in inputs if not isinstance(x, str)]
    if vae_eps is not None and len(vae_eps) != len(images):
        raise ValueError(f"vae_eps: one posterior noise per input image expected ({len(images)}), got "
                         f"{len(vae_eps)}")
    if generation and vae_eps is None and images and key is None:
        raise ValueError("build_contexts: input images need a PRNG `key` or `vae_eps` (the VAE posterior is "
                         "sampled, docs/quirks.md §9.1)")
    items = [tokenizer.encode(x) if isinstance(x, str) else prepare_image(model, x, vae_transform, vit_transform)
             for x in inputs]
    system_ids = None
    if think:
        system_ids = tokenizer.encode(GEN_THINK_SYSTEM_PROMPT if generation else VLM_THINK_SYSTEM_PROMPT)
    lengths = _segment_lengths(model, items, system_ids, generation)
    # Headroom of one padded chunk (a chunk is written as a whole bucket, kv_cache.bucket), rounded up to a
    # multiple of CACHE_GRANULE so that contexts of similar length share compiled functions.
    needed = sum(lengths) + extra_tokens + bucket(max(lengths + [1]))
    max_len = -(-needed // CACHE_GRANULE) * CACHE_GRANULE

    gen = Context.new(model, max_len)
    cfg_text = cfg_img = gen
    if system_ids is not None:
        gen, cfg_img = gen.add_text(system_ids), cfg_img.add_text(system_ids)
    image_shape, image_index = None, 0
    for item in items:
        if isinstance(item, PreparedImage):
            if generation:
                eps = None if vae_eps is None else vae_eps[image_index]
                sub = None if key is None else jax.random.fold_in(key, image_index)
                gen = gen.add_vae_image(item.vae_pixels, eps=eps, key=sub)
            gen = gen.add_vit_image(item.vit_patches, item.vit_grid)
            cfg_text, image_shape, image_index = gen, item.shape, image_index + 1
        else:
            cfg_text = gen
            gen, cfg_img = gen.add_text(item), cfg_img.add_text(item)
    return GuidanceContexts(gen, cfg_text, cfg_img), image_shape


def generate_text_reply(ctx: Context, tokenizer, max_length: int) -> str:
    """Greedy reply of a context (docs/inference.md §5.2), decoded (the start token dropped; <|im_end|> is never
    returned)."""
    ids, _ = ctx.generate_text(max_length)
    return tokenizer.decode(ids[1:])


def _sample(model, contexts, image_shape, *, seed, init_noise, sampler_kwargs, text):
    latents = generate_image(model, contexts, image_shape, seed=seed, init_noise=init_noise, **sampler_kwargs)
    return GeneratedImage(decode_latents(model, latents, image_shape), np.asarray(latents), text)


def text_to_image(model, tokenizer, prompt: str, *, image_shape=(1024, 1024), seed: int = 0, init_noise=None,
                  think: bool = False, max_think_tokens: int = THINK_MAX_TOKENS, **sampler_kwargs) -> GeneratedImage:
    """Generate an (H, W) image for a prompt; sampler settings default to `interleave_inference`'s
    (docs/inference.md §5.5).

    Contexts: cond = [prompt], text-uncond = empty, image-uncond = [prompt] (docs/inference.md §5.3). With think, the
    think system prompt leads the cond and image-uncond contexts and a greedy plan (≤ max_think_tokens) is generated and
    added to the cond context only before sampling (docs/inference.md §5.3 'Think mode'; UNVERIFIED that UniMedVL was
    trained with think data).
    """
    extra = 2 * (max_think_tokens + 2) if think else 0
    contexts, _ = build_contexts(model, tokenizer, [prompt], think=think, extra_tokens=extra)
    text = None
    if think:
        text = generate_text_reply(contexts.cond, tokenizer, max_think_tokens)
        contexts = contexts._replace(cond=contexts.cond.add_text(tokenizer.encode(text)))
    return _sample(model, contexts, image_shape, seed=seed, init_noise=init_noise,
                   sampler_kwargs={**T2I_DEFAULTS, **sampler_kwargs}, text=text)


def edit_image(model, tokenizer, image, instruction: str, *, image_shape=None, seed: int = 42, init_noise=None,
               vae_eps=None, understand_first: bool = False, understand_max_tokens: int = EDIT_UNDERSTAND_MAX_TOKENS,
               vae_transform: ImageTransform = GEN_VAE_TRANSFORM, vit_transform: ImageTransform = GEN_VIT_TRANSFORM,
               **sampler_kwargs) -> GeneratedImage:
    """Edit / translate an image by an instruction; defaults follow the UniMedVL editing demo (docs/inference.md §5.5).

    Contexts for [image, instruction]: cond = image (VAE + ViT) + instruction, text-uncond = image only,
    image-uncond = instruction only (docs/inference.md §5.3). The output (H, W) defaults to the input's
    aspect-preserving VAE-rule size, as in the official code.
    Randomness: `seed` gives the VAE posterior draw and the initial noise unless `vae_eps` (one per image,
    (1, H/f, W/f, C)) or `init_noise` are given.
    understand_first: the UniMedVL generator's pre-pass — a greedy reply (≤ understand_max_tokens) to
    [image (ViT only), instruction] is appended to the instruction as instruction + "\\n\\n" + reply before
    editing (docs/inference.md §5.5). Off by default; that the pre-pass uses the understanding-mode context (ViT only,
    no system prompt) is our reading (UNVERIFIED).
    """
    key = jax.random.key(seed)
    text = None
    if understand_first:
        understand, _ = build_contexts(model, tokenizer, [image, instruction], generation=False,
                                       vae_transform=vae_transform, vit_transform=vit_transform,
                                       extra_tokens=understand_max_tokens + 2)
        text = generate_text_reply(understand.cond, tokenizer, understand_max_tokens)
        instruction = instruction + "\n\n" + text
    contexts, input_shape = build_contexts(model, tokenizer, [image, instruction], vae_transform=vae_transform,
                                           vit_transform=vit_transform, key=jax.random.fold_in(key, 1),
                                           vae_eps=vae_eps)
    return _sample(model, contexts, input_shape if image_shape is None else image_shape, seed=seed,
                   init_noise=init_noise, sampler_kwargs={**EDIT_DEFAULTS, **sampler_kwargs}, text=text)
