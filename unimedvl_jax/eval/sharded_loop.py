"""The loop every evaluation task runs: this process's share of the items, minus those an earlier run finished, in
batches through a work function, each batch's records appended to this process's result file, with a progress
line (docs/evaluation.md "Batching, sharding, resuming").

Process p of P takes items[p::P]. The share depends only on the item list and P, never on what is done, so no
two processes ever work on one item, whatever an earlier run with another process count finished. Barriers (no-ops
in one process) order the run: every process opens its file (cutting off its own unfinished line) before any reads,
all read before any writes, and all finish before the caller reads the results back for the report.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Collection, Sequence

import jax

from unimedvl_jax import distributed
from unimedvl_jax.eval.progress import Progress
from unimedvl_jax.eval.results_store import ResultsWriter, read_results


@dataclasses.dataclass(frozen=True)
class LoopStats:
    """What this process did: items of the evaluation, its share, how many of those an earlier run had finished,
    how many it finished now, how many of all the items (every process's) were finished before this run, and the
    wall time from the start of the loop until every process had finished (seconds, compilation included)."""

    process: int
    processes: int
    total: int
    share: int
    skipped: int
    done_now: int
    done_before: int
    seconds: float

    @property
    def items_per_s(self) -> float | None:
        """This process's items finished per second of the run (None when nothing was left to do)."""
        return self.done_now / self.seconds if self.done_now and self.seconds > 0 else None


def process_share(items: Sequence, process: int, processes: int) -> list:
    """items[process::processes]."""
    if not 0 <= process < processes:
        raise ValueError(f"process {process} of {processes}")
    return list(items[process::processes])


def batches(items: Sequence, size: int) -> list[list]:
    """Consecutive batches of at most `size` items."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def run_items(items: Sequence, work: Callable[[list], list[dict]], out_dir, stem: str, *, batch_size: int,
              label: str, known_ids: Collection[str] | None = None,
              on_batch: Callable[[list], None] | None = None, progress: bool = True) -> LoopStats:
    """Run `work` over this process's unfinished share of `items` (objects with an item_id) in batches of
    `batch_size`; `work(batch)` returns one record per item, in order, each with the item's item_id. Every record
    gets `seconds` (its batch's wall time / batch size) and is appended to `<out>/<stem>.process<k>.jsonl` as soon
    as its batch is done. known_ids: every id the result files may hold (default: the ids of `items`).
    on_batch(batch) runs after each batch is written (tests count what was worked on). Process 0 draws the
    progress line."""
    process, processes = jax.process_index(), jax.process_count()
    ids = [item.item_id for item in items]
    repeated = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
    if repeated:
        raise ValueError(f"{label}: duplicate item ids in the evaluation: {repeated[:10]}")
    known = set(ids) if known_ids is None else set(known_ids)
    with ResultsWriter(out_dir, stem, process) as writer:
        distributed.barrier(f"eval {stem}: result files opened")
        done = read_results(out_dir, stem, known_ids=known)
        distributed.barrier(f"eval {stem}: results read")
        share = process_share(items, process, processes)
        todo = [item for item in share if item.item_id not in done]
        bar = Progress(len(todo), f"{label} (process {process} of {processes}: {len(share)} items, "
                                  f"{len(share) - len(todo)} done earlier)", enabled=progress and process == 0)
        start = time.perf_counter()
        for batch in batches(todo, batch_size):
            t0 = time.perf_counter()
            records = work(batch)
            seconds = (time.perf_counter() - t0) / len(batch)
            if len(records) != len(batch):
                raise RuntimeError(f"{label}: the work function returned {len(records)} records for a batch of "
                                   f"{len(batch)} items")
            for item, record in zip(batch, records):
                if record.get("item_id") != item.item_id:
                    raise RuntimeError(f"{label}: record for {record.get('item_id')!r} where item "
                                       f"{item.item_id!r} was expected")
            writer.write([{**record, "seconds": round(seconds, 6)} for record in records])
            if on_batch is not None:
                on_batch(batch)
            bar.advance(len(batch))
    distributed.barrier(f"eval {stem}: all processes finished")
    return LoopStats(process, processes, len(items), len(share), len(share) - len(todo), len(todo),
                     sum(item.item_id in done for item in items), time.perf_counter() - start)
