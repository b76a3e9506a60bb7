"""Image-to-image tasks (virtual staining, super-resolution, modality translation): each PairedItem's input image is
edited by its instruction (inference/interleave.py::edit_image), the output compared with the target by PSNR and
SSIM, and the scores averaged per task / modality (docs/evaluation.md "Batching, sharding, resuming").

The comparison happens at the output's size: the model writes the input's VAE-rule size (docs/inference.md §5.3),
so the target is resized to it (bicubic) when it differs. Both are uint8 RGB, so the data range is 255. Items are
split over processes like the VQA items; each is one edit on this process's default device (image generation is
not batched), seeded by its position in the full item list so any process count draws the same noise.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from data_pipelines.schema import decode_image
from unimedvl_jax.eval.items import PairedItem
from unimedvl_jax.eval.sharded_loop import LoopStats, run_items
from unimedvl_jax.image_metrics import psnr, ssim
from unimedvl_jax.inference.interleave import edit_image
from unimedvl_jax.inference.loading import InferenceModel

RESULTS = "paired"  # result-file stem: <out>/paired.process<k>.jsonl
DATA_RANGE = 255.0  # uint8 images
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """`text` usable as a file name: characters other than letters, digits, '.', '_', '-' become '_'."""
    return _UNSAFE.sub("_", text)


def check_file_names(ids, what: str) -> None:
    """Raise when two ids share one safe_name (their images would overwrite each other)."""
    seen: dict[str, str] = {}
    for item_id in ids:
        name = safe_name(item_id)
        if name in seen and seen[name] != item_id:
            raise ValueError(f"{what}: ids {seen[name]!r} and {item_id!r} map to one image file name {name!r}; "
                             "rename one")
        seen[name] = item_id


def compare(output: np.ndarray, target_bytes: bytes, *, where: str) -> dict:
    """PSNR / SSIM (data range 255) of a uint8 RGB output against the target resized to the output's size;
    psnr is None (identical=True) when the images are identical."""
    target = decode_image(target_bytes, record_id=where, index=1)
    h, w = output.shape[:2]
    resized = target.size != (w, h)
    if resized:
        target = target.resize((w, h), Image.Resampling.BICUBIC)
    target = np.asarray(target, np.uint8)
    db = psnr(output, target, peak=DATA_RANGE)
    # identical images: PSNR is infinite, which JSON cannot hold; recorded as None with identical=True
    return {"psnr": db if math.isfinite(db) else None, "identical": not math.isfinite(db),
            "ssim": ssim(output, target, data_range=DATA_RANGE), "size": [h, w], "target_resized": resized}


@dataclasses.dataclass(frozen=True)
class PairedWork:
    """The work function of a paired run: one edit per item → {item_id, psnr, identical, ssim, size,
    target_resized, output}."""

    loaded: InferenceModel
    seeds: Mapping[str, int]
    sampler: Mapping
    save_dir: pathlib.Path | None = None

    def __call__(self, batch: list[PairedItem]) -> list[dict]:
        records = []
        for item in batch:
            where = f"paired item {item.item_id!r}"
            image = np.asarray(decode_image(item.input_image, record_id=where, index=0))
            result = edit_image(self.loaded.model, self.loaded.tokenizer, image, item.instruction,
                                seed=self.seeds[item.item_id], vae_transform=self.loaded.vae_transform,
                                vit_transform=self.loaded.vit_transform, **self.sampler)
            record = {"item_id": item.item_id, **compare(result.image, item.target_image, where=where),
                      "output": None}
            if self.save_dir is not None:
                self.save_dir.mkdir(parents=True, exist_ok=True)
                path = self.save_dir / f"{safe_name(item.item_id)}.png"
                Image.fromarray(result.image).save(path)
                record["output"] = path.name
            records.append(record)
        return records


def evaluate_paired(loaded: InferenceModel, items: Sequence[PairedItem], out_dir, *, seed: int = 0,
                    sampler: Mapping | None = None, save_images: bool = False, all_items: Sequence | None = None,
                    on_batch: Callable[[list], None] | None = None, progress: bool = True) -> LoopStats:
    """Edit this process's unfinished share of `items`, appending {item_id, psnr, identical, ssim, size,
    target_resized, output, seconds} to `<out>/paired.process<k>.jsonl`; outputs go to `<out>/images/` with save_images.
    Item i of `all_items` (default `items`) is edited with seed + i. sampler: edit_image's sampler settings."""
    every = list(items if all_items is None else all_items)
    seeds = {item.item_id: seed + i for i, item in enumerate(every)}
    if save_images:
        check_file_names(seeds, "paired items")
    work = PairedWork(loaded, seeds, dict(sampler or {}),
                      pathlib.Path(out_dir) / "images" if save_images else None)
    return run_items(items, work, out_dir, RESULTS, batch_size=1, label="editing", known_ids=set(seeds),
                     on_batch=on_batch, progress=progress)


def _mean(values: list) -> float | None:
    """Mean of the values that are not None (None when there are none)."""
    kept = [v for v in values if v is not None]
    return math.fsum(kept) / len(kept) if kept else None


def _group(rows: list[dict]) -> dict:
    """n, mean PSNR (identical pairs left out and counted), mean SSIM of some result records."""
    return {"n": len(rows), "psnr": _mean([r["psnr"] for r in rows]), "ssim": _mean([r["ssim"] for r in rows]),
            "identical": sum(bool(r["identical"]) for r in rows)}


def summarize_paired(items: Sequence[PairedItem], results: Mapping[str, dict]) -> dict:
    """Mean PSNR / SSIM overall and per value of every category column (task, modality, ...); items without a
    result are counted as missing (and left out of the means); identical pairs (infinite PSNR) are counted and
    left out of the PSNR mean."""
    done = [item for item in items if item.item_id in results]
    missing = [item.item_id for item in items if item.item_id not in results]
    columns = sorted({c for item in items for c in item.categories})
    by_category = {}
    for column in columns:
        groups = collections.defaultdict(list)
        for item in done:
            groups[str(item.categories.get(column, "(missing)"))].append(results[item.item_id])
        by_category[column] = {value: _group(rows) for value, rows in sorted(groups.items())}
    return {**_group([results[item.item_id] for item in done]), "n": len(items), "scored": len(done),
            "missing_results": len(missing), "missing_ids": missing[:20],
            "target_resized": sum(bool(results[item.item_id]["target_resized"]) for item in done),
            "by_category": by_category}
