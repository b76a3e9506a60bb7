"""What a benchmark reader kept, skipped and left out: bad rows counted by reason with the row named, rows left out
by an option (split, language, task) counted, and caveats on rows that were kept (docs/evaluation.md "Benchmark
formats")."""

from __future__ import annotations

import collections
import dataclasses
import logging

from unimedvl_jax.errors import UserError

log = logging.getLogger(__name__)

BAD_ROW_REASONS = (
    "missing_field",       # a required field / cell is absent or empty
    "bad_value",           # a field holds a value outside its documented set (e.g. answer_type 'MAYBE')
    "empty_answer",        # the gold answer normalises to nothing (scoring.normalize_answer)
    "missing_image",       # the image file named by the row does not exist
    "bad_base64",          # an image cell is not valid base64
    "unreadable_image",    # the bytes are not an image PIL recognises
    "bad_image_reference", # a VLMEvalKit short image cell names no row holding a real image
    "duplicate_id",        # the row's id was already used by an earlier row
    "no_matching_option",  # OmniMedVQA: gt_answer equals no option (or more than one)
    "bad_record",          # our own records: data_pipelines.schema.BadRecord (its reason is in the message)
)


class BadRow(UserError):
    """One unusable benchmark row; `where` names the file and row / line / id."""

    def __init__(self, reason: str, where: str, detail: str):
        if reason not in BAD_ROW_REASONS:
            raise ValueError(f"unknown bad-row reason {reason!r} (known: {BAD_ROW_REASONS})")
        super().__init__(f"{where}: {reason}: {detail}")
        self.reason, self.where, self.detail = reason, where, detail


@dataclasses.dataclass
class ReadReport:
    """Counts of one reader call. strict=True raises the first BadRow instead of skipping it.

    bad: skipped unusable rows by reason (BAD_ROW_REASONS); filtered: rows left out on purpose by an option
    (e.g. 'q_lang=zh', 'split=train'); notes: rows kept with a caveat (e.g. 'gt_answer matched after
    normalisation'); examples: the first `keep_examples` messages per bad-row reason and per note."""

    source: str = ""
    strict: bool = False
    keep_examples: int = 5
    items: int = 0
    bad: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    filtered: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    notes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

    def bad_row(self, error: BadRow) -> None:
        """Count and log one bad row (or raise it when strict)."""
        if self.strict:
            raise error
        self.bad[error.reason] += 1
        self._example(error.reason, str(error))
        log.warning("skipping %s", error)

    def filter(self, why: str, n: int = 1) -> None:
        """Count rows left out on purpose (by an option such as split or q_lang)."""
        self.filtered[why] += n

    def note(self, what: str, where: str) -> None:
        """Count a caveat on a row that was kept."""
        self.notes[what] += 1
        self._example(what, f"{where}: {what}")

    def _example(self, key: str, message: str) -> None:
        if len(self.examples[key]) < self.keep_examples:
            self.examples[key].append(message)

    @property
    def total_bad(self) -> int:
        """Number of skipped bad rows."""
        return sum(self.bad.values())

    def as_dict(self) -> dict:
        """JSON-friendly summary (for the evaluation report)."""
        return {"source": self.source, "items": self.items, "bad_rows": self.total_bad,
                "bad_by_reason": dict(sorted(self.bad.items())), "filtered": dict(sorted(self.filtered.items())),
                "notes": dict(sorted(self.notes.items())),
                "examples": {k: list(v) for k, v in sorted(self.examples.items())}}

    def summary(self) -> str:
        """One line: items read, bad rows by reason, filtered rows, notes."""
        parts = [f"{self.items} items from {self.source}"]
        if self.bad:
            parts.append(f"skipped {self.total_bad} bad rows ({_counts(self.bad)})")
        if self.filtered:
            parts.append(f"left out {sum(self.filtered.values())} rows by option ({_counts(self.filtered)})")
        if self.notes:
            parts.append(f"notes: {_counts(self.notes)}")
        return "; ".join(parts)


def _counts(counter: collections.Counter) -> str:
    """'a: 2, b: 1' in key order."""
    return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items()))
