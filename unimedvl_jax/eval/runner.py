"""Answer benchmark questions (EvalItems) with a loaded model: batches of prompts decoded greedily together, the
rows of a batch optionally split over this process's devices, the items split over processes, predictions appended
to `<out>/predictions.process<k>.jsonl` so an interrupted run continues where it stopped (docs/evaluation.md
"Batching, sharding, resuming").

A prompt is the item's images through the ViT path, then the question text from scoring.build_prompt (the
Bagel.chat flow, docs/inference.md §5.4). Every prompt of a run gets the same cache size (the longest prompt of
all the items + the answer budget, rounded up to a power of two ≥ 256) and every batch the same row count: which
batch, process or device an item lands on then changes nothing about the computation of its row, and one compiled
decode step serves the whole run.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Mapping, Sequence

from PIL import Image

from data_pipelines.schema import decode_image
from data_pipelines.transforms import patchify_vit
from unimedvl_jax.eval.items import EvalItem
from unimedvl_jax.eval.scoring import build_prompt
from unimedvl_jax.eval.sharded_loop import LoopStats, run_items
from unimedvl_jax.inference.kv_cache import bucket
from unimedvl_jax.inference.loading import InferenceModel
from unimedvl_jax.inference.row_sharding import RowSharding
from unimedvl_jax.inference.text_generation import ImageSegment, TextSegment, generate

PREDICTIONS = "predictions"  # result-file stem: <out>/predictions.process<k>.jsonl
MIN_CACHE = 256


def _where(item: EvalItem) -> str:
    return f"{item.benchmark} item {item.item_id!r}"


def image_grid(data: bytes, loaded: InferenceModel, img_num: int, where: str) -> tuple[int, int]:
    """ViT patch grid (h, w) an encoded image gets, from its header alone (no pixel decoding)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Exception as e:  # PIL raises many types for corrupt data
        raise ValueError(f"{where}: unreadable image ({type(e).__name__}: {e})") from e
    new_w, new_h = loaded.vit_transform.target_size(w, h, img_num=img_num)
    patch = loaded.cfg.vit.patch_size
    return new_h // patch, new_w // patch


def prompt_length(item: EvalItem, loaded: InferenceModel, templates=None) -> int:
    """Cache slots the item's prompt fills (images h·w + 2 each, text L + 2), without decoding its images."""
    n = len(item.images)
    images = sum(h * w + 2 for h, w in (image_grid(data, loaded, n, f"{_where(item)} image {k}")
                                        for k, data in enumerate(item.images)))
    return images + len(loaded.tokenizer.encode(build_prompt(item, templates))) + 2


def run_cache_size(items: Sequence[EvalItem], loaded: InferenceModel, max_new_tokens: int, templates=None) -> int:
    """The cache size of every prompt of a run: the longest prompt + the answer budget + the start token, rounded
    up to a power of two ≥ 256."""
    if not items:
        raise ValueError("run_cache_size: no items")
    longest = max(prompt_length(item, loaded, templates) for item in items)
    return bucket(longest + max_new_tokens + 1, minimum=MIN_CACHE)


def item_prompt(item: EvalItem, loaded: InferenceModel, templates=None) -> list:
    """[ImageSegment per image, TextSegment(prompt ids)] of one item."""
    if not item.images:
        raise ValueError(f"{_where(item)}: no image")
    patch, segments = loaded.cfg.vit.patch_size, []
    for k, data in enumerate(item.images):
        pixels = loaded.vit_transform(decode_image(data, record_id=_where(item), index=k), img_num=len(item.images))
        segments.append(ImageSegment(patchify_vit(pixels, patch), (pixels.shape[0] // patch,
                                                                   pixels.shape[1] // patch)))
    segments.append(TextSegment(loaded.tokenizer.encode(build_prompt(item, templates))))
    return segments


@dataclasses.dataclass(frozen=True)
class BatchAnswerer:
    """The work function of a VQA run: a batch of items → [{item_id, prediction}], decoded greedily as `rows`
    rows in caches of `max_len` slots, split over `row_sharding`'s devices when given."""

    loaded: InferenceModel
    max_new_tokens: int
    max_len: int
    rows: int
    row_sharding: RowSharding | None = None
    templates: Mapping | None = None

    def __call__(self, batch: list[EvalItem]) -> list[dict]:
        if len(batch) > self.rows:
            raise ValueError(f"a batch of {len(batch)} items does not fit {self.rows} rows")
        prompts = [item_prompt(item, self.loaded, self.templates) for item in batch]
        ids = generate(self.loaded.model, prompts, self.max_new_tokens, max_len=self.max_len, rows=self.rows,
                       row_sharding=self.row_sharding)
        return [{"item_id": item.item_id, "prediction": self.loaded.tokenizer.decode(row)}
                for item, row in zip(batch, ids)]


def answer_items(loaded: InferenceModel, items: Sequence[EvalItem], out_dir, *, batch_size: int = 8,
                 max_new_tokens: int = 16, templates=None, row_sharding: RowSharding | None = None,
                 cache_items: Sequence[EvalItem] | None = None, known_ids=None,
                 on_batch: Callable[[list], None] | None = None, progress: bool = True) -> LoopStats:
    """Answer this process's unfinished share of `items` into `<out>/predictions.process<k>.jsonl` ({item_id,
    prediction, seconds} per line) and return the loop's stats.

    cache_items: the items that size the cache (default `items`; pass the unlimited list when `items` is a
    --limit prefix, so a limited run computes exactly what the full run would). known_ids: every id the
    prediction files may hold (default: the ids of cache_items)."""
    sizing = list(items if cache_items is None else cache_items)
    if not items:
        raise ValueError("answer_items: no items")
    rows = batch_size if row_sharding is None else row_sharding.rows(batch_size)
    work = BatchAnswerer(loaded, max_new_tokens, run_cache_size(sizing, loaded, max_new_tokens, templates), rows,
                         row_sharding, templates)
    return run_items(items, work, out_dir, PREDICTIONS, batch_size=batch_size, label="answering",
                     known_ids={i.item_id for i in sizing} if known_ids is None else known_ids,
                     on_batch=on_batch, progress=progress)
