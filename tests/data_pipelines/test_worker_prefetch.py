"""Decoding streams (data_pipelines/worker_prefetch.py): elements arrive in order, the readers decode only
`read_buffer_size` elements ahead (grain's default is 500), and closing a stream whose elements are larger than a
pipe buffer stops its worker in bounded time (grain alone waited 25 s). A worker whose training process is killed
exits by itself. Stream options the data config cannot run with are refused when made."""

import os
import pathlib
import subprocess
import sys
import textwrap
import threading
import time

import grain
import pytest

from data_pipelines.worker_prefetch import (
    PARENT_POLL_S,
    WORKER_STOP_TIMEOUT_S,
    StreamOptions,
    close_stream,
    prefetch_in_workers,
)
from unimedvl_jax.data_config import data_config
from unimedvl_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[2]
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


KILLED_PARENT = textwrap.dedent("""
    import multiprocessing, os, signal
    from absl import flags
    import grain
    from data_pipelines.worker_prefetch import StreamOptions, prefetch_in_workers

    if __name__ == "__main__":
        flags.FLAGS.mark_as_parsed()
        it = prefetch_in_workers(grain.MapDataset.source(list(range(1000))).map(lambda i: bytes(1 << 20)),
                                 StreamOptions(num_workers=1, worker_buffer_size=2))
        next(it)  # the worker runs and fills its queue
        print("WORKERS", *[p.pid for p in multiprocessing.active_children()], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def _alive(pid: int) -> bool:
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited (nobody reaped it yet)


def test_worker_exits_when_its_training_process_is_killed(tmp_path):
    script = tmp_path / "killed_parent.py"
    script.write_text(KILLED_PARENT)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:  # files: a surviving worker would hold a pipe open
        rc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=stdout, stderr=stderr,
                            timeout=120).returncode
    assert rc == -9, err.read_text()[-3000:]
    workers = [int(p) for line in out.read_text().splitlines() if line.startswith("WORKERS") for p in line.split()[1:]]
    assert len(workers) == 1, out.read_text()
    deadline = time.monotonic() + PARENT_POLL_S + 15
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [p for p in workers if _alive(p)]
    for p in alive:  # do not leave it behind when the test fails
        os.kill(p, 9)
    assert not alive, "the worker outlived its killed parent"


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


def test_a_fractional_stream_option_is_refused():
    with pytest.raises(UserError, match="data.read_threads=1.5 must be an integer >= 1"):
        StreamOptions(read_threads=1.5)


def test_stream_options_follow_the_data_config():
    options = StreamOptions.from_config(data_config(num_workers=2, read_threads=3, read_buffer_size=5))
    assert options == StreamOptions(num_workers=2, read_threads=3, read_buffer_size=5)
    assert StreamOptions.from_config(data_config(num_workers=2), num_workers=0).num_workers == 0
