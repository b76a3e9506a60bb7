"""Decoding streams (data_pipelines/worker_prefetch.py): elements arrive in order, the readers decode only
`read_buffer_size` elements ahead (grain's default is 500), closing a stream whose elements are larger than a pipe
buffer stops its worker in bounded time (grain alone waited 25 s), and sample plans travel in shared memory, so that
an idle worker stops by itself."""

import dataclasses
import multiprocessing
import threading
import time

import grain
import jax
import numpy as np
import pytest

from data_pipelines.sample_plan import SamplePlan
from data_pipelines.worker_prefetch import WORKER_STOP_TIMEOUT_S, close_stream, prefetch_in_workers

ELEMENT_BYTES = 1 << 20  # 16× a Linux pipe buffer: the worker's queue feeder is still writing when the stream stops


def big_elements():
    return grain.MapDataset.source(list(range(100))).map(lambda i: (i, bytes([i]) * ELEMENT_BYTES))


def test_worker_stream_yields_in_order_and_closes_in_bounded_time():
    it = prefetch_in_workers(big_elements(), num_workers=1, buffer_size=4)
    for i in range(3):
        index, payload = next(it)
        assert index == i and len(payload) == ELEMENT_BYTES and payload[:1] == bytes([i])
    time.sleep(1.0)  # the worker fills its buffer and blocks writing the next element
    start = time.perf_counter()
    close_stream(it)
    # grain's own wait is 25 s; ours is WORKER_STOP_TIMEOUT_S plus the kill.
    assert time.perf_counter() - start < WORKER_STOP_TIMEOUT_S + 8.0


def test_in_process_stream_needs_no_worker():
    it = prefetch_in_workers(big_elements(), num_workers=0, buffer_size=4)
    assert [next(it)[0] for _ in range(3)] == [0, 1, 2]
    close_stream(it)


def test_readers_decode_a_bounded_number_of_elements_ahead():
    decoded, lock = [], threading.Lock()

    def decode(i):
        with lock:
            decoded.append(i)
        return i

    it = prefetch_in_workers(grain.MapDataset.source(list(range(1000))).map(decode), num_workers=0, buffer_size=4,
                             read_threads=2, read_buffer_size=8)
    assert [next(it) for _ in range(5)] == list(range(5))
    time.sleep(0.5)  # let the readers fill their read-ahead
    # 5 taken + 8 read ahead (+ one in flight per reader thread); grain's default reads up to 500 ahead.
    assert 5 <= len(decoded) <= 5 + 8 + 2, len(decoded)
    close_stream(it)


@pytest.mark.parametrize("threads,ahead", [(0, 8), (2, 0)])
def test_bad_read_options_are_refused(threads, ahead):
    with pytest.raises(ValueError, match="read_threads and read_buffer_size"):
        prefetch_in_workers(big_elements(), num_workers=0, buffer_size=4, read_threads=threads,
                            read_buffer_size=ahead)


def big_plan(i: int) -> SamplePlan:
    """A SamplePlan whose ViT patches and VAE image are 1 MiB each (the index arrays are small)."""
    small = {f.name: np.full(4, i, np.int32) for f in dataclasses.fields(SamplePlan)}
    small.update(record_id=f"r{i}", task="understanding", items=[],
                 vit_patches=np.full((ELEMENT_BYTES // 4 // 588, 588), i, np.float32),
                 vae_images=[np.full((ELEMENT_BYTES // 4 // 3, 3), i, np.float32)])
    return SamplePlan(**small)


def test_plans_leave_workers_in_shared_memory_so_an_idle_worker_stops_by_itself():
    plan = big_plan(0)
    assert any(leaf is plan.vit_patches for leaf in jax.tree.leaves(plan))  # a pytree: grain can reach its arrays
    it = prefetch_in_workers(grain.MapDataset.source(list(range(100))).map(big_plan), num_workers=1, buffer_size=4)
    for i in range(3):
        got = next(it)
        assert got.record_id == f"r{i}" and got.vit_patches.shape == plan.vit_patches.shape
        assert float(got.vit_patches[-1, -1]) == i and float(got.vae_images[0][-1, -1]) == i
    time.sleep(1.0)  # the worker fills its queue and idles
    (worker,) = multiprocessing.active_children()
    close_stream(it)
    # With whole plans pickled into its pipe, the worker's feeder would still be writing one: grain kills it (-9)
    # after WORKER_STOP_TIMEOUT_S.
    assert worker.exitcode == 0
