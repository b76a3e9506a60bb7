"""Counting bad records by reason: each one is logged with its record id, and the pipeline continues."""

from __future__ import annotations

import collections
import logging

from data_pipelines.schema import BadRecord

log = logging.getLogger(__name__)


class BadRecordCounter:
    """Collects BadRecord errors: counts per reason, the first few messages per reason and (keep_records > 0, as
    the dataset builder does) the reason, record id and manifest line of the first `keep_records` bad records."""

    def __init__(self, keep_examples: int = 5, keep_records: int = 0):
        self.counts: collections.Counter = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self.records: list[dict] = []
        self._keep, self._keep_records = keep_examples, keep_records

    def add(self, error: BadRecord) -> None:
        """Log and count one bad record."""
        self.counts[error.reason] += 1
        if len(self.examples[error.reason]) < self._keep:
            self.examples[error.reason].append(str(error))
        if len(self.records) < self._keep_records:
            self.records.append({"reason": error.reason, "id": error.record_id, "line": error.line})
        log.warning("skipping %s", error)

    @property
    def total(self) -> int:
        """Number of bad records seen."""
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        """JSON-friendly summary: {'total': n, 'by_reason': {...}, 'examples': {...}}; with keep_records > 0 also
        'records': [{'reason', 'id', 'line'}, ...] (the first keep_records) and 'records_not_listed' (the rest)."""
        out = {"total": self.total, "by_reason": dict(sorted(self.counts.items())),
               "examples": {k: list(v) for k, v in sorted(self.examples.items())}}
        if self._keep_records:
            out.update(records=list(self.records), records_not_listed=self.total - len(self.records))
        return out
