"""Hand builder of small PackedBatches for tests, following the official `pack_sequence` rules (spec §4.2–4.4).

A sample is a list of items (`Text`, `VitImage`, `VaeImage`); `build_packed_batch` lays the samples out one
after another, derives every PackedBatch field the way §4.2 does, and returns the latents and flow noise the
training forward needs. Real tokens always come first in every static-capacity buffer; padding follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from flax import nnx

from unimedvl_jax.patches import patchify
from unimedvl_jax.packed_batch import CAUSAL, FULL, NOISE, PAD, PackedBatch, TEXT, VAE, VIT

CAPACITY_KEYS = ("und", "gen", "ce", "vit", "vae", "vae_images")


@dataclass
class Text:
    """A text segment: [bos] + ids + [eos], causal; `loss` adds next-token CE over [bos, ids] (§4.2)."""

    ids: Sequence[int]
    loss: bool = False
    special_token_label: int | None = None  # CE label at the closing [eos] position (special_token_loss)
    dropped: bool = False  # CFG-dropped text: no tokens and rope does not move


@dataclass
class VitImage:
    """A ViT condition of h×w patches; pixels (h·p, w·p, 3) in [-1, 1] (random if None); dropped: rope += 1 only."""

    patches_hw: tuple[int, int]
    pixels: np.ndarray | None = None
    dropped: bool = False


@dataclass
class VaeImage:
    """A VAE image of h×w latent tokens: noised (MSE target, raw draw n=timestep) or clean (n = -inf)."""

    latent_hw: tuple[int, int]
    noised: bool = False
    timestep: float = 0.0
    latent: np.ndarray | None = None  # (p·h, p·w, z_channels) normalised latent; random normal if None
    noise: np.ndarray | None = None   # (h·w, p·p·z_channels) flow noise ε; random normal if None
    dropped: bool = False


def small_model_config():
    """A 2-layer MoT with every path on (QK-norm, ViT, bridges) and a minimal VAE, for fast tests (fp32)."""
    import ml_collections

    from unimedvl_jax import config as C

    return C.model_config(
        llm=C.llm_config(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                         vocab_size=256, rope_theta=10000.0, qk_norm=True, layer_module="mot"),
        vit=C.vit_config(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, image_size=112),
        vae=C.vae_config(ch=8, ch_mult=[1, 1], num_res_blocks=1, downsample=2, norm_groups=4, z_channels=4),
        latent_patch_size=2, max_latent_size=8, vit_max_num_patch_per_side=8,
        special_tokens=ml_collections.ConfigDict(dict(bos_token_id=252, eos_token_id=253, start_of_image=254,
                                                      end_of_image=255)))


def param_dict(module) -> dict:
    """{dotted path: nnx.Param} over every parameter of `module` (for copying reference weights in)."""
    return {".".join(map(str, path)): var for path, var in nnx.iter_graph(module) if isinstance(var, nnx.Param)}


def _grid(hw, what, limit):
    """Validate an (h, w) grid against a position-table side."""
    try:
        h, w = (int(v) for v in hw)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected an (h, w) pair of ints, got {hw!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{what}: grid {h}x{w} must be at least 1x1")
    if h > limit or w > limit:
        raise ValueError(f"{what}: grid {h}x{w} exceeds the {limit}x{limit} position table")
    return h, w


def _pad(values, capacity, fill, dtype, what):
    """Pad a 1-D (or row-stacked) array to `capacity` rows with `fill`; error if it does not fit."""
    arr = np.asarray(values, dtype)
    if capacity is None:
        return arr
    if arr.shape[0] > capacity:
        raise ValueError(f"capacity {what}={capacity} is smaller than the {arr.shape[0]} entries needed")
    pad = np.full((capacity - arr.shape[0],) + arr.shape[1:], fill, dtype)
    return np.concatenate([arr, pad], axis=0)


def _rng(rng):
    """A numpy Generator from None (seed 0), an int seed or a Generator."""
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(0 if rng is None else int(rng))
    if isinstance(rng, np.random.Generator):
        return rng
    raise ValueError(f"rng must be None, an int seed or a numpy Generator, got {type(rng).__name__}")


def build_packed_batch(samples, cfg_model, *, pad_to: int | None = None, capacities: dict | None = None,
                       rng=None):
    """(PackedBatch, latents (N, p·h_max, p·w_max, z) NHWC, flow_noise (V, p·p·z)) for `samples` (§4.2–4.4).

    samples: list of samples, each a list of Text / VitImage / VaeImage items.
    pad_to: total length T; the tail becomes one causal PAD sample with its own sample and split id (§4.3).
    capacities: optional static sizes for the buffers 'und', 'gen', 'ce' (routing / CE slots, padded with T),
      'vit' (patches P), 'vae' (latent tokens V) and 'vae_images' (N).
    rng: None (seed 0), an int seed or a numpy Generator, for pixels, latents and noise not given explicitly.

    vae_images are zeros of the padded pixel size (N, ds·p·h_max, ds·p·w_max, 3): the model forward takes the
    latents directly, so pixel images are placeholders for a later VAE-encoding train step.
    """
    capacities = dict(capacities or {})
    unknown = sorted(set(capacities) - set(CAPACITY_KEYS))
    if unknown:
        raise ValueError(f"unknown capacity keys {unknown}; expected a subset of {CAPACITY_KEYS}")
    if not samples:
        raise ValueError("build_packed_batch needs at least one sample")
    rng = _rng(rng)
    st = cfg_model.special_tokens
    vocab = cfg_model.llm.vocab_size
    vp, vc = cfg_model.vit.patch_size, cfg_model.vit.num_channels
    vit_side = cfg_model.vit_max_num_patch_per_side
    lp, z = cfg_model.latent_patch_size, cfg_model.vae.z_channels
    lat_side = cfg_model.max_latent_size
    for name in ("bos_token_id", "eos_token_id", "start_of_image", "end_of_image"):
        if not 0 <= st[name] < vocab:
            raise ValueError(f"special token {name}={st[name]} outside the vocabulary [0, {vocab})")

    kind, text_ids, sample_id, split_id, split_mode, position_ids = [], [], [], [], [], []
    ce_index, ce_labels = [], []
    vit_patches, vit_pos, vit_img, vit_tok = [], [], [], []
    vae_img, vae_row, vae_col, vae_pos, vae_tok, vae_t = [], [], [], [], [], []
    image_latents, noise_rows = [], []
    n_split, n_vit_images = 0, 0

    def add_split(kinds, ids, positions, mode, s):
        nonlocal n_split
        kind.extend(kinds), text_ids.extend(ids), position_ids.extend(positions)
        sample_id.extend([s] * len(kinds)), split_id.extend([n_split] * len(kinds))
        split_mode.extend([mode] * len(kinds))
        n_split += 1

    for s, sample in enumerate(samples):
        if isinstance(sample, (Text, VitImage, VaeImage)):
            raise ValueError(f"sample {s}: expected a list of items, got a single {type(sample).__name__}")
        rope, start = 0, len(kind)
        for i, item in enumerate(sample):
            where = f"sample {s} item {i} ({type(item).__name__})"
            if isinstance(item, Text):
                ids = [int(t) for t in item.ids]
                bad = [t for t in ids if not 0 <= t < vocab]
                if bad:
                    raise ValueError(f"{where}: token ids {bad[:5]} outside the vocabulary [0, {vocab})")
                if item.dropped:
                    continue
                toks = [st.bos_token_id] + ids + [st.eos_token_id]
                first = len(kind)
                add_split([TEXT] * len(toks), toks, range(rope, rope + len(toks)), CAUSAL, s)
                rope += len(toks)
                if item.loss:  # [bos, t1..tL] predict [t1..tL, eos]
                    ce_index.extend(range(first, first + len(toks) - 1)), ce_labels.extend(toks[1:])
                if item.special_token_label is not None:
                    if not 0 <= int(item.special_token_label) < vocab:
                        raise ValueError(f"{where}: special_token_label {item.special_token_label} outside "
                                         f"the vocabulary [0, {vocab})")
                    ce_index.append(first + len(toks) - 1), ce_labels.append(int(item.special_token_label))
            elif isinstance(item, VitImage):
                h, w = _grid(item.patches_hw, where, vit_side)
                if item.dropped:
                    rope += 1
                    continue
                pixels = item.pixels
                if pixels is None:
                    pixels = rng.uniform(-1.0, 1.0, (h * vp, w * vp, vc)).astype(np.float32)
                pixels = np.asarray(pixels, np.float32)
                if pixels.shape != (h * vp, w * vp, vc):
                    raise ValueError(f"{where}: pixels of shape {pixels.shape}, expected {(h * vp, w * vp, vc)}")
                vit_patches.append(patchify(pixels, vp))
                r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
                vit_pos.extend((r * vit_side + c).reshape(-1)), vit_img.extend([n_vit_images] * (h * w))
                n_vit_images += 1
                first = len(kind)
                vit_tok.extend(range(first + 1, first + 1 + h * w))
                add_split([TEXT] + [VIT] * (h * w) + [TEXT], [st.start_of_image] + [0] * (h * w)
                          + [st.end_of_image], [rope] * (h * w + 2), FULL, s)
                rope += 1
            elif isinstance(item, VaeImage):
                h, w = _grid(item.latent_hw, where, lat_side)
                if item.dropped:
                    rope += 1
                    continue
                if item.noised and not np.isfinite(item.timestep):
                    raise ValueError(f"{where}: a noised image needs a finite timestep draw, got {item.timestep}")
                latent = item.latent
                if latent is None:
                    latent = rng.standard_normal((lp * h, lp * w, z)).astype(np.float32)
                latent = np.asarray(latent, np.float32)
                if latent.shape != (lp * h, lp * w, z):
                    raise ValueError(f"{where}: latent of shape {latent.shape}, expected {(lp * h, lp * w, z)}")
                noise = item.noise
                if noise is None:
                    noise = rng.standard_normal((h * w, lp * lp * z)).astype(np.float32)
                noise = np.asarray(noise, np.float32)
                if noise.shape != (h * w, lp * lp * z):
                    raise ValueError(f"{where}: noise of shape {noise.shape}, expected {(h * w, lp * lp * z)}")
                r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
                first = len(kind)
                vae_img.extend([len(image_latents)] * (h * w))
                vae_row.extend(r.reshape(-1)), vae_col.extend(c.reshape(-1))
                vae_pos.extend((r * lat_side + c).reshape(-1))
                vae_tok.extend(range(first + 1, first + 1 + h * w))
                vae_t.extend([float(item.timestep) if item.noised else -np.inf] * (h * w))
                image_latents.append(latent), noise_rows.append(noise)
                add_split([TEXT] + [VAE] * (h * w) + [TEXT], [st.start_of_image] + [0] * (h * w)
                          + [st.end_of_image], [rope] * (h * w + 2), NOISE if item.noised else FULL, s)
                if not item.noised:  # a noised target shares its position with the next item (§4.2)
                    rope += 1
            else:
                raise ValueError(f"{where}: unknown item type; expected Text, VitImage or VaeImage")
        if len(kind) == start:
            raise ValueError(f"sample {s} has no tokens (empty, or every item dropped)")

    length = len(kind)
    total = length if pad_to is None else int(pad_to)
    if total < length:
        raise ValueError(f"pad_to={pad_to} is shorter than the {length} real tokens")
    if total > length:  # one trailing causal pad sample (§4.3)
        n = total - length
        kind.extend([PAD] * n), text_ids.extend([0] * n), position_ids.extend([0] * n)
        sample_id.extend([len(samples)] * n), split_id.extend([n_split] * n), split_mode.extend([CAUSAL] * n)

    kind_arr = np.asarray(kind, np.int32)
    und = np.nonzero((kind_arr == TEXT) | (kind_arr == VIT))[0]
    gen = np.nonzero(kind_arr == VAE)[0]
    cap = capacities.get
    i32 = np.int32

    # ViT patches: padding patches form their own image id so they never attend to a real image.
    patch_dim = vp * vp * vc
    patches = np.concatenate(vit_patches) if vit_patches else np.zeros((0, patch_dim), np.float32)

    # Latents: each image top-left in the batch-max grid, zeros elsewhere (only the valid region is read).
    n_images = len(image_latents)
    n_images_out = n_images if cap("vae_images") is None else cap("vae_images")
    if n_images_out < n_images:
        raise ValueError(f"capacity vae_images={n_images_out} is smaller than the {n_images} VAE images")
    n_vae = len(vae_tok) if cap("vae") is None else cap("vae")
    if n_vae > 0:
        n_images_out = max(n_images_out, 1)  # padding tokens read image 0: keep it present
    hmax = max([lat.shape[0] for lat in image_latents], default=lp)
    wmax = max([lat.shape[1] for lat in image_latents], default=lp)
    latents = np.zeros((n_images_out, hmax, wmax, z), np.float32)
    for n, lat in enumerate(image_latents):
        latents[n, : lat.shape[0], : lat.shape[1]] = lat
    ds = cfg_model.vae.downsample
    vae_images = np.zeros((n_images_out, ds * hmax, ds * wmax, 3), np.float32)
    noise = np.concatenate(noise_rows) if noise_rows else np.zeros((0, lp * lp * z), np.float32)

    batch = PackedBatch(
        text_ids=np.asarray(text_ids, i32), token_kind=kind_arr, sample_id=np.asarray(sample_id, i32),
        split_id=np.asarray(split_id, i32), split_mode=np.asarray(split_mode, i32),
        position_ids=np.asarray(position_ids, i32),
        und_index=_pad(und, cap("und"), total, i32, "und"),
        gen_index=_pad(gen, cap("gen"), total, i32, "gen"),
        ce_index=_pad(ce_index, cap("ce"), total, i32, "ce"),
        ce_labels=_pad(ce_labels, cap("ce"), 0, i32, "ce"),
        ce_weight=_pad(np.ones(len(ce_index)), cap("ce"), 0.0, np.float32, "ce"),
        vit_patches=_pad(patches, cap("vit"), 0.0, np.float32, "vit"),
        vit_position_ids=_pad(vit_pos, cap("vit"), 0, i32, "vit"),
        vit_image_id=_pad(vit_img, cap("vit"), n_vit_images, i32, "vit"),
        vit_token_index=_pad(vit_tok, cap("vit"), total, i32, "vit"),
        vae_images=vae_images,
        vae_token_image=_pad(vae_img, cap("vae"), 0, i32, "vae"),
        vae_token_row=_pad(vae_row, cap("vae"), 0, i32, "vae"),
        vae_token_col=_pad(vae_col, cap("vae"), 0, i32, "vae"),
        vae_position_ids=_pad(vae_pos, cap("vae"), 0, i32, "vae"),
        vae_token_index=_pad(vae_tok, cap("vae"), total, i32, "vae"),
        vae_timestep=_pad(vae_t, cap("vae"), -np.inf, np.float32, "vae"),
    )
    return batch, latents, _pad(noise, cap("vae"), 0.0, np.float32, "vae")
