"""A decoding stream over a grain MapDataset: a few reader threads ahead of the consumer, optionally in worker
processes, with a bounded stop (docs/architecture.md, Library notes).

Read-ahead: `MapDataset.to_iter_dataset()` without options reads with 16 threads up to 500 elements ahead (grain
0.2.18), sized for remote storage. Our elements are decoded images and sample plans, produced on the CPU, so that
default kept 16 threads decoding up to 500 samples per stream (per worker process, per mixture group) that training
had not asked for: CPU taken from the train step, memory, and on every curriculum stage switch the whole read-ahead
of the finished stage thrown away. The streams here read with `read_threads` threads up to `read_buffer_size`
elements ahead (the data config's `read_threads` / `read_buffer_size`).

Stop: grain stops a prefetch worker by setting its stop event and joining the process for up to 25 s before it kills
it. A worker exits by itself only when its queue's feeder thread has nothing left to write; when an element larger
than the pipe buffer (64 KiB) is still being written and nobody reads it any more, the worker's exit waits for that
write forever. Our elements carry images, so every close of a worker-backed stream (each curriculum stage switch,
the end of training) waited the full 25 s. A stream is only closed when nothing will read it again, so the wait is
bounded by WORKER_STOP_TIMEOUT_S instead; a worker that stops by itself still exits first.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time

import grain

from unimedvl_jax.data_config import READ_BUFFER_SIZE, READ_THREADS, validate_stream_options

WORKER_STOP_TIMEOUT_S = 2.0
PARENT_POLL_S = 1.0  # how often a worker checks that the process that started it is still alive

try:  # grain's worker-process prefetch (a private module: without it, grain's own timeout applies)
    from grain._src.python.dataset.transformations import process_prefetch as _process_prefetch
except ImportError:  # pragma: no cover - other grain layouts
    _process_prefetch = None


def bound_worker_stop(timeout_s: float = WORKER_STOP_TIMEOUT_S) -> None:
    """Make grain wait at most `timeout_s` for a stopped prefetch worker before killing it."""
    name = "_PROCESS_KILL_TIMEOUT_S"
    if _process_prefetch is not None and getattr(_process_prefetch, name, 0) > timeout_s:
        setattr(_process_prefetch, name, timeout_s)


@dataclasses.dataclass(frozen=True)
class StreamOptions:
    """How a stream decodes: `read_threads` threads at most `read_buffer_size` elements ahead, in each of
    `num_workers` grain worker processes (`worker_buffer_size` elements queued per worker), or in the consuming
    process when num_workers is 0. Checked when made (the data config's keys, a UserError)."""

    num_workers: int = 0
    worker_buffer_size: int = 8
    read_threads: int = READ_THREADS
    read_buffer_size: int = READ_BUFFER_SIZE

    def __post_init__(self):
        validate_stream_options(dataclasses.asdict(self))
        if self.worker_buffer_size < 1:
            raise ValueError(f"worker_buffer_size must be >= 1, got {self.worker_buffer_size}")

    @classmethod
    def from_config(cls, data_cfg, num_workers: int | None = None) -> "StreamOptions":
        """The data config's stream settings; `num_workers` overrides data.num_workers."""
        return cls(num_workers=data_cfg.num_workers if num_workers is None else num_workers,
                   read_threads=data_cfg.read_threads, read_buffer_size=data_cfg.read_buffer_size)


IN_PROCESS = StreamOptions()  # decoding in the consuming process with the default reader settings


def exit_with_parent(parent_pid: int, worker_index: int = 0, worker_count: int = 1) -> None:
    """In a worker process: exit as soon as `parent_pid` is no longer its parent (the process that started it died,
    e.g. SIGKILL, and the worker was re-parented). grain's workers do not notice that by themselves: a worker
    blocked on its full queue would otherwise live on with its decoded data (~250 MB) after a killed training run."""
    del worker_index, worker_count  # grain's worker_init_fn arguments

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)  # no cleanup to run: the stream's reader is gone

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def prefetch_in_workers(ds: grain.MapDataset, options: StreamOptions = IN_PROCESS):
    """An iterator over `ds`, decoded as `options` say."""
    stream = ds.to_iter_dataset(grain.ReadOptions(num_threads=options.read_threads,
                                                  prefetch_buffer_size=options.read_buffer_size))
    if options.num_workers > 0:
        bound_worker_stop()
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=options.num_workers,
                                                                 per_worker_buffer_size=options.worker_buffer_size),
                                    worker_init_fn=functools.partial(exit_with_parent, os.getpid()))
    return iter(stream)


def close_stream(iterator) -> None:
    """Stop a stream's worker processes now (no-op for None or an in-process iterator)."""
    getattr(iterator, "close", lambda: None)()
