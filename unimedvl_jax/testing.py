"""Small PackedBatches (and tiny saved runs) for tests.

A sample is a list of hand-described items (`Text`, `VitImage`, `VaeImage`). `build_packed_batch` turns each
sample into a docs/packed_sequence.md §4.2 sample plan with the data pipeline's own `PlanBuilder` and packs the plans
with its `Packer` (docs/packed_sequence.md §4.3–4.4), so tests see exactly the layout training sees; it also returns the
latents and flow noise the training forward needs. Real tokens always come first in every static-capacity buffer;
padding follows.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from typing import Sequence

import ml_collections
import numpy as np
from flax import nnx

from data_pipelines.packing import COUNT_BUDGETS, PackBudgets, Packer
from data_pipelines.sample_plan import PlanBuilder
from unimedvl_jax import config as C
from unimedvl_jax.data_config import data_config
from unimedvl_jax.interop.params_checkpoint import save_params_checkpoint
from unimedvl_jax.models.unimedvl import UniMedVL
from unimedvl_jax.tokenizers import SentencePieceTokenizer

# build_packed_batch capacity key -> the Packer budget it sets
CAPACITY_BUDGETS = dict(und="und_capacity", gen="gen_capacity", ce="max_ce", vit="max_vit_patches",
                        vae="max_vae_tokens", vae_images="max_vae_images")
CAPACITY_KEYS = tuple(CAPACITY_BUDGETS)


@dataclass
class Text:
    """A text segment: [bos] + ids + [eos], causal; `loss` adds next-token CE over [bos, ids]
    (docs/packed_sequence.md §4.2)."""

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
    special_token_label: int | None = None  # CE label at the closing <|vision_end|> position (special_token_loss)


@dataclass
class VaeImage:
    """A VAE image of h×w latent tokens: noised (MSE target, raw draw n=timestep) or clean (n = -inf)."""

    latent_hw: tuple[int, int]
    noised: bool = False
    timestep: float = 0.0
    latent: np.ndarray | None = None  # (p·h, p·w, z_channels) normalised latent; random normal if None
    noise: np.ndarray | None = None   # (h·w, p·p·z_channels) flow noise ε; random normal if None
    dropped: bool = False
    special_token_label: int | None = None  # CE label at the closing <|vision_end|> position (special_token_loss)


def small_model_config():
    """A 2-layer MoT with every path on (QK-norm, ViT, bridges) and a minimal VAE, for fast tests (fp32)."""
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


def save_inference_workdir(run, model_cfg, data_cfg, corpus: Sequence[str], *, seed: int = 0) -> pathlib.Path:
    """A training workdir as inference loads it, for a randomly initialised model: final/ (params checkpoint, the
    same weights as params and EMA), tokenizer/ (SentencePiece trained on `corpus`) and config.json (the run's
    data section, which holds the image transforms and the generation size)."""
    run = pathlib.Path(run)
    with nnx.use_eager_sharding(False):
        model = UniMedVL(model_cfg, rngs=nnx.Rngs(seed))
    save_params_checkpoint(run / "final", model, model_cfg, ema_model=model)
    SentencePieceTokenizer.train(list(corpus), vocab_size=int(model_cfg.llm.vocab_size),
                                 special_ids=dict(model_cfg.special_tokens)).save(run / "tokenizer")
    (run / "config.json").write_text(json.dumps({"data": data_cfg.to_dict()}))
    return run


def save_small_inference_workdir(run, corpus: Sequence[str]) -> pathlib.Path:
    """save_inference_workdir of small_model_config with a 1,024-piece vocabulary (special tokens at 1000-1003),
    56-pixel ViT and 32-pixel VAE transforms and a 16×24 generation size: the tiny run that inference, loading and
    evaluation tests share."""
    cfg = small_model_config()
    cfg.llm.vocab_size = 1024
    cfg.special_tokens.update(dict(bos_token_id=1000, eos_token_id=1001, start_of_image=1002, end_of_image=1003))
    data = data_config(vit_transform=dict(max_size=56, min_size=28, stride=14),
                       vae_transform=dict(max_size=32, min_size=16, stride=4), vae_image_size=(16, 24))
    return save_inference_workdir(run, cfg, data, corpus)


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


def _array(given, shape, draw, what):
    """`given` (or a draw of `shape`) as float32, checked against `shape`."""
    arr = np.asarray(draw(shape) if given is None else given, np.float32)
    if arr.shape != shape:
        raise ValueError(f"{what} of shape {arr.shape}, expected {shape}")
    return arr


def _rng(rng):
    """A numpy Generator from None (seed 0), an int seed or a Generator."""
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(0 if rng is None else int(rng))
    if isinstance(rng, np.random.Generator):
        return rng
    raise ValueError(f"rng must be None, an int seed or a numpy Generator, got {type(rng).__name__}")


def _add_item(b: PlanBuilder, item, i: int, where: str, cfg, rng, latents: list, noises: list) -> None:
    """Add one hand-described item to a sample's plan; VAE images get zero pixels of their size (the forward
    takes the latents directly) and their latent and flow noise are collected."""
    label = getattr(item, "special_token_label", None)
    if isinstance(item, Text):
        b.text(item.ids, segment=i, loss=item.loss, dropped=item.dropped, special_label=label)
    elif isinstance(item, VitImage):
        h, w = _grid(item.patches_hw, where, cfg.vit_max_num_patch_per_side)
        p, c = cfg.vit.patch_size, cfg.vit.num_channels
        pixels = None if item.dropped else _array(item.pixels, (h * p, w * p, c),
                                                  lambda s: rng.uniform(-1.0, 1.0, s), f"{where}: pixels")
        b.vit_image(pixels, segment=i, dropped=item.dropped, special_label=label)
    elif isinstance(item, VaeImage):
        h, w = _grid(item.latent_hw, where, cfg.max_latent_size)
        if item.dropped:
            b.vae_image(None, segment=i, noised=item.noised, timestep=item.timestep, dropped=True)
            return
        if item.noised and not np.isfinite(item.timestep):
            raise ValueError(f"{where}: a noised image needs a finite timestep draw, got {item.timestep}")
        p, z, stride = cfg.latent_patch_size, cfg.vae.z_channels, cfg.vae.downsample * cfg.latent_patch_size
        latents.append(_array(item.latent, (p * h, p * w, z), rng.standard_normal, f"{where}: latent"))
        noises.append(_array(item.noise, (h * w, p * p * z), rng.standard_normal, f"{where}: noise"))
        b.vae_image(np.zeros((h * stride, w * stride, 3), np.float32), segment=i, noised=item.noised,
                    timestep=item.timestep, dropped=False, special_label=label)
    else:
        raise ValueError(f"{where}: unknown item type; expected Text, VitImage or VaeImage")


def build_packed_batch(samples, cfg_model, *, pad_to: int | None = None, capacities: dict | None = None,
                       rng=None):
    """(PackedBatch, latents (N, p·h_max, p·w_max, z) NHWC, flow_noise (V, p·p·z)) for `samples`
    (docs/packed_sequence.md §4.2–4.4).

    samples: list of samples, each a list of Text / VitImage / VaeImage items.
    pad_to: total length T; the tail becomes one causal PAD sample with its own sample and split id
      (docs/packed_sequence.md §4.3). Default: no padding.
    capacities: optional static sizes for the buffers 'und', 'gen', 'ce' (routing / CE slots, padded with T),
      'vit' (patches P), 'vae' (latent tokens V) and 'vae_images' (N); each defaults to what the samples use.
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
    plans, latents, noises = [], [], []
    for s, sample in enumerate(samples):
        if isinstance(sample, (Text, VitImage, VaeImage)):
            raise ValueError(f"sample {s}: expected a list of items, got a single {type(sample).__name__}")
        b = PlanBuilder(f"sample {s}", cfg_model)
        for i, item in enumerate(sample):
            _add_item(b, item, i, f"sample {s} item {i} ({type(item).__name__})", cfg_model, rng, latents, noises)
        plans.append(b.build("test"))

    # Budgets: what the samples need, or the static sizes asked for.
    need = {n: sum(p.usage()[n] for p in plans) for n in COUNT_BUDGETS}
    budgets = dict(need)
    if pad_to is not None:
        if pad_to < need["max_tokens"]:
            raise ValueError(f"pad_to={pad_to} is shorter than the {need['max_tokens']} real tokens")
        budgets["max_tokens"] = int(pad_to)
    for key, cap in capacities.items():
        if cap < need[CAPACITY_BUDGETS[key]]:
            raise ValueError(f"capacity {key}={cap} is smaller than the {need[CAPACITY_BUDGETS[key]]} entries needed")
        budgets[CAPACITY_BUDGETS[key]] = int(cap)
    if budgets["max_vae_tokens"]:  # padding latent tokens read image 0: keep it present
        budgets["max_vae_images"] = max(budgets["max_vae_images"], 1)
    ds, p, z = cfg_model.vae.downsample, cfg_model.latent_patch_size, cfg_model.vae.z_channels
    sizes = [img.shape[:2] for plan in plans for img in plan.vae_images]
    size = tuple(max([hw[a] for hw in sizes], default=ds * p) for a in (0, 1))
    packer = Packer(PackBudgets(**budgets, vae_image_size=size),
                    vit_patch_dim=cfg_model.vit.patch_size ** 2 * cfg_model.vit.num_channels)
    (pack,) = packer.pack_all(plans)

    # Latents top-left in the batch-max grid (zeros elsewhere: only the valid region is read); noise rows padded.
    out = np.zeros((budgets["max_vae_images"], size[0] // ds, size[1] // ds, z), np.float32)
    for n, lat in enumerate(latents):
        out[n, : lat.shape[0], : lat.shape[1]] = lat
    noise = np.zeros((budgets["max_vae_tokens"], p * p * z), np.float32)
    if noises:
        rows = np.concatenate(noises)
        noise[: len(rows)] = rows
    return pack.batch, out, noise


def random_pack_samples(rng, *, num_samples: int = 3, max_items: int = 4):
    """Random samples for attention tests: text / ViT / clean VAE / noised VAE items in random order, with an image
    block opening the first sample and closing the last, so every split kind appears at sample starts and ends."""
    rng = _rng(rng)

    def image():
        hw = tuple(int(x) for x in rng.integers(1, 4, size=2))
        kind = rng.integers(3)
        return VitImage(hw) if kind == 0 else VaeImage(hw, noised=bool(kind == 2), timestep=0.3)

    samples = []
    for s in range(num_samples):
        items = [Text([int(t) for t in rng.integers(1, 50, size=rng.integers(1, 12))]) if rng.random() < 0.5
                 else image() for _ in range(rng.integers(1, max_items + 1))]
        if s == 0:
            items.insert(0, image())
        if s == num_samples - 1:
            items.append(image())
        samples.append(items)
    return samples
