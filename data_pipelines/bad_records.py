"""Counting bad records by reason: each one is logged with its record id, and the pipeline continues."""

from __future__ import annotations

import collections
import logging

from data_pipelines.schema import BadRecord

log = logging.getLogger(__name__)


class BadRecordCounter:
    """Collects BadRecord errors: counts per reason, keeps the first few messages per reason."""

    def __init__(self, keep_examples: int = 5):
        self.counts: collections.Counter = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self._keep = keep_examples

    def add(self, error: BadRecord) -> None:
        """Log and count one bad record."""
        self.counts[error.reason] += 1
        if len(self.examples[error.reason]) < self._keep:
            self.examples[error.reason].append(str(error))
        log.warning("skipping %s", error)

    @property
    def total(self) -> int:
        """Number of bad records seen."""
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        """JSON-friendly summary: {'total': n, 'by_reason': {...}, 'examples': {...}}."""
        return {"total": self.total, "by_reason": dict(sorted(self.counts.items())),
                "examples": {k: list(v) for k, v in sorted(self.examples.items())}}
