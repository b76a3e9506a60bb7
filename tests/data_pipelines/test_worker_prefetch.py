"""Decoding streams (data_pipelines/worker_prefetch.py): elements arrive in order, the readers decode only
`read_buffer_size` elements ahead (grain's default is 500), and closing a stream whose elements are larger than a
pipe buffer stops its worker in bounded time (grain alone waited 25 s). Stream options the data config cannot
run with are refused when made."""

import threading
import time

import grain
import pytest

from data_pipelines.worker_prefetch import WORKER_STOP_TIMEOUT_S, StreamOptions, close_stream, prefetch_in_workers
from unimedvl_jax.data_config import data_config
from unimedvl_jax.errors import UserError

ELEMENT_BYTES = 1 << 20  # 16× a Linux pipe buffer: the worker's queue feeder is still writing when the stream stops


def big_elements():
    return grain.MapDataset.source(list(range(100))).map(lambda i: (i, bytes([i]) * ELEMENT_BYTES))


def test_worker_stream_yields_in_order_and_closes_in_bounded_time():
    it = prefetch_in_workers(big_elements(), StreamOptions(num_workers=1, worker_buffer_size=4))
    for i in range(3):
        index, payload = next(it)
        assert index == i and len(payload) == ELEMENT_BYTES and payload[:1] == bytes([i])
    time.sleep(1.0)  # the worker fills its buffer and blocks writing the next element
    start = time.perf_counter()
    close_stream(it)
    # grain's own wait is 25 s; ours is WORKER_STOP_TIMEOUT_S plus the kill.
    assert time.perf_counter() - start < WORKER_STOP_TIMEOUT_S + 8.0


def test_in_process_stream_needs_no_worker():
    it = prefetch_in_workers(big_elements())
    assert [next(it)[0] for _ in range(3)] == [0, 1, 2]
    close_stream(it)


def test_readers_decode_a_bounded_number_of_elements_ahead():
    decoded, lock = [], threading.Lock()

    def decode(i):
        with lock:
            decoded.append(i)
        return i

    it = prefetch_in_workers(grain.MapDataset.source(list(range(1000))).map(decode),
                             StreamOptions(read_threads=2, read_buffer_size=8))
    assert [next(it) for _ in range(5)] == list(range(5))
    time.sleep(0.5)  # let the readers fill their read-ahead
    # 5 taken + 8 read ahead (+ one in flight per reader thread); grain's default reads up to 500 ahead.
    assert 5 <= len(decoded) <= 5 + 8 + 2, len(decoded)
    close_stream(it)


@pytest.mark.parametrize("key,value,message", [
    ("num_workers", -1, "data.num_workers=-1 must be an integer >= 0"),
    ("read_threads", 0, "data.read_threads=0 must be an integer >= 1"),
    ("read_buffer_size", 0, "data.read_buffer_size=0 must be an integer >= 1"),
])
def test_bad_stream_options_are_refused_naming_the_config_key(key, value, message):
    with pytest.raises(UserError, match=message):
        StreamOptions(**{key: value})
    with pytest.raises(UserError, match=message):
        StreamOptions.from_config(data_config(**{key: value}))
    with pytest.raises(UserError, match="data.read_threads=1.5 must be an integer >= 1"):
        StreamOptions(read_threads=1.5)


def test_stream_options_follow_the_data_config():
    options = StreamOptions.from_config(data_config(num_workers=2, read_threads=3, read_buffer_size=5))
    assert options == StreamOptions(num_workers=2, read_threads=3, read_buffer_size=5)
    assert StreamOptions.from_config(data_config(num_workers=2), num_workers=0).num_workers == 0
