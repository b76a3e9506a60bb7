"""Closed-form VQA evaluation: ask each held-out image a question with a ground-truth answer (from DICOM tags /
source metadata), decode greedily with the KV cache and score normalised exact match, per modality, next to the
majority-answer baseline (the honest reference point on an imbalanced split)."""

from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np
from PIL import Image

from data_pipelines.pipeline import source_records
from data_pipelines.schema import decode_image
from data_pipelines.transforms import ImageTransform, patchify_vit
from unimedvl_jax.inference.text_generation import ImageSegment, TextSegment, generate


@dataclasses.dataclass(frozen=True)
class VQAItem:
    """One held-out question: the record it comes from, its image, the question and the ground truth."""

    record_id: str
    modality: str
    image: bytes
    question: str
    answer: str
    source_scan: str = ""     # the scan / volume / cine the image came from (items of one scan are not independent)


def normalize(text: str) -> str:
    """Lower-case, drop punctuation and extra spaces (for exact-match scoring)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _first_pair(record, wanted: set[str]):
    """The first (question, answer) text pair of an understanding record whose normalised question is wanted."""
    segs = record.segments
    if record.task != "understanding" or not segs or segs[0].kind != "image":
        return None
    for q, a in zip(segs, segs[1:]):
        if q.kind == a.kind == "text" and q.role == "context" and a.role == "answer" and normalize(q.text) in wanted:
            return q.text, a.text
    return None


def _item(record, pair) -> VQAItem:
    return VQAItem(record.id, record.modality, record.images[record.segments[0].image], *pair, record.source_scan)


def vqa_items(source, questions: tuple[str, ...], *, limit: int | None = None) -> list[VQAItem]:
    """(image, question, answer) items of a source's understanding records whose question is one of `questions`."""
    items, wanted = [], {normalize(q) for q in questions}
    for record in source_records(source, name="vqa source"):
        pair = _first_pair(record, wanted)
        if pair is not None:
            items.append(_item(record, pair))
        if limit is not None and len(items) >= limit:
            break
    return items


def family_items(source, families: dict[str, tuple[str, ...]], *,
                 max_per_scan: int | None = None) -> dict[str, list[VQAItem]]:
    """Items of every question family (name -> phrasings) in one pass over `source`; with `max_per_scan`, at most
    that many per family and source scan, spread evenly over the scan's records (a volume's slices are not
    independent questions, and a long volume would otherwise outweigh every 2-D image)."""
    wanted = {name: {normalize(q) for q in phrasings} for name, phrasings in families.items()}
    by_scan = {name: collections.defaultdict(list) for name in families}
    for record in source_records(source, name="vqa source"):
        for name, questions in wanted.items():
            pair = _first_pair(record, questions)
            if pair is not None:
                by_scan[name][record.source_scan].append(_item(record, pair))
    out = {}
    for name, scans in by_scan.items():
        items = []
        for scan_items in scans.values():
            if max_per_scan is not None and len(scan_items) > max_per_scan:
                picks = np.linspace(0, len(scan_items) - 1, max_per_scan).round().astype(int)
                scan_items = [scan_items[i] for i in picks]
            items += scan_items
        out[name] = items
    return out


def answer(model, tokenizer, transform: ImageTransform, image_bytes: bytes, question: str, *,
           max_new_tokens: int = 16, record_id: str = "?") -> str:
    """Greedy answer of the model to one question about one encoded image (Bagel.chat flow, docs/inference.md §5.4)."""
    return answer_image(model, tokenizer, transform, decode_image(image_bytes, record_id=record_id), question,
                        max_new_tokens=max_new_tokens)


def answer_image(model, tokenizer, transform: ImageTransform, image, question: str, *,
                 max_new_tokens: int = 16) -> str:
    """Greedy answer to one question about one image (PIL image or uint8 array; Bagel.chat flow,
    docs/inference.md §5.4)."""
    pixels = transform(Image.fromarray(image) if isinstance(image, np.ndarray) else image)
    patch = model.cfg.vit.patch_size
    grid = (pixels.shape[0] // patch, pixels.shape[1] // patch)
    prompt = [ImageSegment(patchify_vit(pixels, patch), grid), TextSegment(tokenizer.encode(question))]
    return tokenizer.decode(generate(model, [prompt], max_new_tokens)[0])


def evaluate(model, tokenizer, transform: ImageTransform, items: list[VQAItem], *, max_new_tokens: int = 16,
             min_scans: int = 2):
    """Accuracy (normalised exact match) overall and per modality, the majority baseline, and every answer.

    `macro_accuracy` is the mean of the per-modality accuracies over modalities with at least `min_scans` distinct
    source scans; `majority_macro` is what always answering the majority answer would score on that mean."""
    rows, hits, totals, scans = [], collections.Counter(), collections.Counter(), collections.defaultdict(set)
    for item in items:
        predicted = answer(model, tokenizer, transform, item.image, item.question, max_new_tokens=max_new_tokens,
                           record_id=item.record_id)
        ok = normalize(predicted) == normalize(item.answer)
        hits[item.modality] += ok
        totals[item.modality] += 1
        scans[item.modality].add(item.source_scan)
        rows.append({"id": item.record_id, "modality": item.modality, "question": item.question,
                     "answer": item.answer, "predicted": predicted, "correct": bool(ok)})
    n = len(items)
    majority = collections.Counter(normalize(i.answer) for i in items).most_common(1)
    majority_answer = majority[0][0] if majority else None
    per_modality = {}
    for m in sorted(totals):
        majority_hits = sum(normalize(i.answer) == majority_answer for i in items if i.modality == m)
        per_modality[m] = {"n": totals[m], "scans": len(scans[m]), "accuracy": hits[m] / totals[m],
                           "majority_baseline": majority_hits / totals[m]}
    counted = [m for m, r in per_modality.items() if r["scans"] >= min_scans]
    macro = lambda key: float(np.mean([per_modality[m][key] for m in counted])) if counted else float("nan")  # noqa: E731
    return {
        "n": n,
        "accuracy": sum(hits.values()) / n if n else float("nan"),
        "per_modality": per_modality,
        "majority_answer": majority_answer,
        "majority_baseline": majority[0][1] / n if n else float("nan"),
        "macro_modalities": counted,
        "macro_accuracy": macro("accuracy"),
        "majority_macro": macro("majority_baseline"),
        "answers": rows,
    }
