"""The one item schema every benchmark reader produces, and the paired items of image-to-image tasks."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

ANSWER_TYPES = ("closed", "open", "choice")


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One question of a benchmark: encoded image file(s), the question, the gold answer and grouping fields.

    For multiple choice (`answer_type == "choice"`) `options` lists (letter, text) pairs in order and `answer` is
    the gold letter. `categories` holds the benchmark's own grouping columns (modality, organ, question type, ...)
    for the breakdowns of the report."""

    benchmark: str
    item_id: str                        # unique within the benchmark (the key of the predictions file)
    images: tuple[bytes, ...]           # encoded image files (PNG / JPEG / ...), in the order the question uses
    question: str
    answer: str
    answer_type: str                    # one of ANSWER_TYPES
    options: tuple[tuple[str, str], ...] = ()
    categories: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(f"{self.benchmark} item {self.item_id!r}: answer_type {self.answer_type!r} not in "
                             f"{ANSWER_TYPES}")
        if self.answer_type == "choice" and self.answer not in dict(self.options):
            raise ValueError(f"{self.benchmark} item {self.item_id!r}: gold letter {self.answer!r} is not one of "
                             f"the options {[k for k, _ in self.options]}")


@dataclasses.dataclass(frozen=True)
class PairedItem:
    """One image-to-image task instance: input image, instruction, target image (all from a manifest)."""

    item_id: str
    input_image: bytes
    instruction: str
    target_image: bytes
    categories: Mapping[str, str] = dataclasses.field(default_factory=dict)
