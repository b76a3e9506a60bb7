"""The per-process JSONL result files of an evaluation run, read back to resume it, and the run's settings file
that keeps a rerun from mixing results made with other settings (docs/evaluation.md "Batching, sharding,
resuming").

`<out>/<stem>.process<k>.jsonl` holds one JSON object per finished item (`item_id` plus the task's fields), written
only by process k and flushed to disk after every batch. A run of any process count reads back every
`<stem>.process*.jsonl` of the directory, so a run continues where an earlier one (with the same or another
process count) stopped. A last line without its newline is a write cut off by the interruption: readers ignore it
(with a warning) and its owner truncates it before appending, so that item is simply done again.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
from collections.abc import Collection, Mapping

from unimedvl_jax.errors import UserError

log = logging.getLogger(__name__)

SETTINGS_FILE = "run.json"
TIMING_KEYS = ("seconds",)  # fields that may differ between two records of one item (everything else must agree)


class ResultsError(UserError):
    """A result file or the run's settings file that cannot be used; the message names the file and line / key."""


def results_path(out_dir, stem: str, process: int) -> pathlib.Path:
    """`<out>/<stem>.process<k>.jsonl`."""
    return pathlib.Path(out_dir) / f"{stem}.process{process}.jsonl"


def result_files(out_dir, stem: str) -> list[pathlib.Path]:
    """Every `<stem>.process<k>.jsonl` in out_dir, by process number."""
    pattern = re.compile(rf"{re.escape(stem)}\.process(\d+)\.jsonl")
    found = [(int(m.group(1)), p) for p in pathlib.Path(out_dir).glob(f"{stem}.process*.jsonl")
             if (m := pattern.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def _finished_lines(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line number, text) of the complete lines of a result file; an unterminated last line is skipped."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines[-1]:
        log.warning("%s: ignoring an unfinished last line (%d characters; a write cut off by an interruption), "
                    "its item will be done again", path, len(lines[-1]))
    return [(n, line) for n, line in enumerate(lines[:-1], start=1) if line.strip()]


def read_results(out_dir, stem: str, *, known_ids: Collection[str] | None = None) -> dict[str, dict]:
    """item_id -> record over every result file of `stem` in out_dir.

    Raises ResultsError for a complete line that is not a JSON object with a string item_id, an item id not in
    `known_ids` (results of another benchmark or split), and an item recorded twice with different values."""
    results: dict[str, dict] = {}
    where: dict[str, str] = {}
    for path in result_files(out_dir, stem):
        for n, line in _finished_lines(path):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ResultsError(f"{path}:{n}: not JSON ({e.msg}); fix or delete the line to resume") from e
            if not isinstance(record, dict) or not isinstance(record.get("item_id"), str):
                raise ResultsError(f"{path}:{n}: expected a JSON object with a string item_id, got {line[:120]!r}")
            item_id = record["item_id"]
            if known_ids is not None and item_id not in known_ids:
                raise ResultsError(f"{path}:{n}: item {item_id!r} is not an item of this evaluation (results of "
                                   "another benchmark, split or data directory? use another --out)")
            if item_id in results:
                if _values(results[item_id]) != _values(record):
                    raise ResultsError(f"{path}:{n}: item {item_id!r} was already recorded at {where[item_id]} "
                                       f"with other values ({_values(results[item_id])} vs {_values(record)})")
                continue
            results[item_id], where[item_id] = record, f"{path}:{n}"
    return results


def _values(record: Mapping) -> dict:
    """A record without its timing fields."""
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


class ResultsWriter:
    """Appends records to this process's result file; every `write` is flushed and fsync'ed (one call per
    batch), so an interruption loses at most the batch being written."""

    def __init__(self, out_dir, stem: str, process: int):
        self.path = results_path(out_dir, stem, process)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_unfinished_line(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, records: list[dict]) -> None:
        """Append records (each with a string item_id) and flush them to disk."""
        for record in records:
            if not isinstance(record.get("item_id"), str):
                raise ValueError(f"{self.path}: a record needs a string item_id, got {record!r}")
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _truncate_unfinished_line(path: pathlib.Path) -> None:
    """Cut a last line without newline (an interrupted write) off this process's own file before appending."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    log.warning("%s: dropping an unfinished last line (%d bytes, an interrupted write); its item is done again",
                path, len(data) - keep)
    with open(path, "r+b") as f:
        f.truncate(keep)


def check_settings(out_dir, settings: Mapping, *, write: bool) -> None:
    """Compare `settings` with `<out>/run.json` of an earlier run: when they differ and result files exist, raise
    ResultsError naming every key that differs (the results would mix settings). With write=True, (re)write the
    file when it is missing or differs while no results exist yet (atomically)."""
    out = pathlib.Path(out_dir)
    path = out / SETTINGS_FILE
    wanted = json.loads(json.dumps(dict(settings)))  # as it reads back (tuples become lists)
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ResultsError(f"{path}: not JSON ({e.msg})") from e
        if not isinstance(saved, dict):
            raise ResultsError(f"{path}: expected a JSON object of run settings")
        differing = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        if not differing:
            return
        results = sorted(p.name for p in out.glob("*.process*.jsonl"))
        if results:
            details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {wanted.get(k)!r}" for k in differing)
            raise ResultsError(f"{path}: the results in {out_dir} ({', '.join(results[:4])}"
                               f"{', ...' if len(results) > 4 else ''}) were made with other settings ({details}); "
                               "rerun with the same settings to resume, or use another --out")
        log.warning("%s: replacing the settings of an earlier run that left no results (%s differed)", path,
                    ", ".join(differing))
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(wanted, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
