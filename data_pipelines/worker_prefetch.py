"""Prefetching a grain stream in worker processes, with a bounded stop (docs/architecture.md, Library notes).

grain (0.2.18) stops a prefetch worker by setting its stop event and joining the process for up to 25 s before it
kills it. A worker exits by itself only when its queue's feeder thread has nothing left to write; when an element
larger than the pipe buffer (64 KiB) is still being written and nobody reads it any more, the worker's exit waits
for that write forever. Our elements carry images, so every close of a worker-backed stream (each curriculum stage
switch, the end of training) waited the full 25 s. A stream is only closed when nothing will read it again, so
the wait is bounded by WORKER_STOP_TIMEOUT_S instead; a worker that stops by itself still exits first.
"""

from __future__ import annotations

import grain

WORKER_STOP_TIMEOUT_S = 2.0

try:  # grain's worker-process prefetch (a private module: without it, grain's own timeout applies)
    from grain._src.python.dataset.transformations import process_prefetch as _process_prefetch
except ImportError:  # pragma: no cover - other grain layouts
    _process_prefetch = None


def bound_worker_stop(timeout_s: float = WORKER_STOP_TIMEOUT_S) -> None:
    """Make grain wait at most `timeout_s` for a stopped prefetch worker before killing it."""
    name = "_PROCESS_KILL_TIMEOUT_S"
    if _process_prefetch is not None and getattr(_process_prefetch, name, 0) > timeout_s:
        setattr(_process_prefetch, name, timeout_s)


def prefetch_in_workers(ds: grain.IterDataset, num_workers: int, buffer_size: int):
    """An iterator over `ds` produced by `num_workers` grain worker processes (the calling process when 0)."""
    if num_workers > 0:
        bound_worker_stop()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=buffer_size))
    return iter(ds)


def close_stream(iterator) -> None:
    """Stop a stream's worker processes now (no-op for None or an in-process iterator)."""
    getattr(iterator, "close", lambda: None)()
