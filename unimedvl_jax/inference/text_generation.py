"""Batched text generation from prompts of text and ViT-image segments (docs/inference.md §5.2), e.g. many VQA questions
at once.

Each prompt is prefilled into its own context (docs/inference.md §5.1: text via add_text, images via add_vit_image, in
order), then all rows decode together (decoding.decode). Prompts may differ in length and in their images' sizes.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import numpy as np

from unimedvl_jax.inference.context import Context
from unimedvl_jax.inference.decoding import decode
from unimedvl_jax.inference.kv_cache import bucket
from unimedvl_jax.inference.row_sharding import RowSharding


@dataclasses.dataclass(frozen=True)
class TextSegment:
    """Token ids of one text segment; the cache holds <|im_start|> + ids + <|im_end|> (docs/packed_sequence.md §4.1)."""

    ids: Sequence[int]


@dataclasses.dataclass(frozen=True)
class ImageSegment:
    """One image for the ViT path: patches (h·w, p·p·3) in patchify_vit order and the patch grid (h, w)."""

    patches: np.ndarray
    grid_hw: tuple[int, int]


Segment = Union[TextSegment, ImageSegment]


def prompt_length(prompt: Sequence[Segment]) -> int:
    """Number of cache slots the prompt fills (text L + 2, image h·w + 2)."""
    total = 0
    for i, seg in enumerate(prompt):
        if isinstance(seg, TextSegment):
            total += len(seg.ids) + 2
        elif isinstance(seg, ImageSegment):
            total += int(np.prod(seg.grid_hw)) + 2
        else:
            raise ValueError(f"segment {i}: expected TextSegment or ImageSegment, got {type(seg).__name__}")
    return total


def prefill(model, prompt: Sequence[Segment], max_len: int) -> Context:
    """A context of max_len slots holding the prompt's segments in order."""
    ctx = Context.new(model, max_len)
    for seg in prompt:
        if isinstance(seg, TextSegment):
            ctx = ctx.add_text(seg.ids)
        else:
            ctx = ctx.add_vit_image(seg.patches, seg.grid_hw)
    return ctx


def generate(model, prompts: Sequence[Sequence[Segment]], max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, max_len: int | None = None, rows: int | None = None,
             row_sharding: RowSharding | None = None) -> list[list[int]]:
    """Generated token ids per prompt, without the start token and the stop token <|im_end|>.

    Greedy when temperature is 0, else temperature + top-p sampling, deterministic given the seed. Each row
    stops at <|im_end|> or after max_new_tokens tokens. max_len is the cache size; by default the next power
    of two ≥ 256 that fits the longest prompt, so prompts of different lengths share one compiled step.
    rows / row_sharding: as decoding.decode (a fixed row count; rows split over devices, each prompt prefilled on
    the device that holds its row).
    """
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    needed = max(prompt_length(p) for p in prompts) + max_new_tokens + 1  # + the start token
    if max_len is None:
        max_len = bucket(needed, minimum=256)
    elif max_len < needed:
        raise ValueError(f"max_len={max_len} is smaller than the {needed} slots the longest prompt needs")
    if row_sharding is None:
        contexts = [prefill(model, p, max_len) for p in prompts]
    else:
        rows = row_sharding.rows(len(prompts) if rows is None else rows)
        contexts = [prefill(row_sharding.model_for_row(i, rows), p, max_len) for i, p in enumerate(prompts)]
    # docs/inference.md §5.2 counts the start token as step 1, so max_new_tokens new tokens take max_new_tokens + 1
    # steps.
    out = decode(contexts, max_new_tokens + 1, temperature=temperature, top_p=top_p, seed=seed, rows=rows,
                 row_sharding=row_sharding)
    return [ids[1:] for ids in out.ids]
