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


def normalize(text: str) -> str:
    """Lower-case, drop punctuation and extra spaces (for exact-match scoring)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def vqa_items(source, questions: tuple[str, ...], *, limit: int | None = None) -> list[VQAItem]:
    """(image, question, answer) items of a source's understanding records whose question is one of `questions`."""
    items, wanted = [], {normalize(q) for q in questions}
    for record in source_records(source, name="vqa source"):
        segs = record.segments
        if record.task != "understanding" or not segs or segs[0].kind != "image":
            continue
        for q, a in zip(segs, segs[1:]):
            if q.kind == a.kind == "text" and q.role == "context" and a.role == "answer" \
                    and normalize(q.text) in wanted:
                items.append(VQAItem(record.id, record.modality, record.images[segs[0].image], q.text, a.text))
                break
        if limit is not None and len(items) >= limit:
            break
    return items


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


def evaluate(model, tokenizer, transform: ImageTransform, items: list[VQAItem], *, max_new_tokens: int = 16):
    """Accuracy (normalised exact match) overall and per modality, the majority baseline, and every answer."""
    rows, hits, totals = [], collections.Counter(), collections.Counter()
    for item in items:
        predicted = answer(model, tokenizer, transform, item.image, item.question, max_new_tokens=max_new_tokens,
                           record_id=item.record_id)
        ok = normalize(predicted) == normalize(item.answer)
        hits[item.modality] += ok
        totals[item.modality] += 1
        rows.append({"id": item.record_id, "modality": item.modality, "question": item.question,
                     "answer": item.answer, "predicted": predicted, "correct": bool(ok)})
    n = len(items)
    majority = collections.Counter(normalize(i.answer) for i in items).most_common(1)
    return {
        "n": n,
        "accuracy": sum(hits.values()) / n if n else float("nan"),
        "per_modality": {m: {"n": totals[m], "accuracy": hits[m] / totals[m]} for m in sorted(totals)},
        "majority_answer": majority[0][0] if majority else None,
        "majority_baseline": majority[0][1] / n if n else float("nan"),
        "answers": rows,
    }


