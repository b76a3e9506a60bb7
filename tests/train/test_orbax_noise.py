"""OrbaxNoise (train/checkpoint_faults.py): which asyncio / unraisable reports around a failed orbax read are kept off
the console. The end-to-end fault runs are tests/faults/."""

import logging
import os
import sys

from unimedvl_jax.train.checkpoint_faults import OrbaxNoise


def _raise_from(filename: str) -> BaseException:
    """An exception whose traceback passes through code compiled as `filename`."""
    namespace = {}
    exec(compile("def read():\n    raise Exception('OUT_OF_RANGE: Error reading params.x')\n", filename, "exec"),
         namespace)
    try:
        namespace["read"]()
    except Exception as exc:  # noqa: BLE001
        return exc


def _asyncio_record(exc: BaseException) -> logging.LogRecord:
    """The asyncio logger's report of a gathered future whose exception nobody retrieved (message without 'orbax')."""
    return logging.LogRecord("asyncio", logging.ERROR, "/usr/lib/python3/asyncio/base_events.py", 1,
                             "_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture finished "
                             "exception=Exception('...')>", None, (type(exc), exc, exc.__traceback__))


def test_asyncio_report_of_an_abandoned_orbax_read_is_kept_off_the_console():
    noise = OrbaxNoise()
    orbax_file = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "serialization.py")
    assert noise.filter(_asyncio_record(_raise_from(orbax_file))) is False
    assert list(noise.counts) == ["asyncio: _GatheringFuture exception was never retrieved"]
    wrapped = ValueError("wrapped")  # raised while handling an orbax error: the chain is followed
    wrapped.__context__ = _raise_from(orbax_file)
    assert noise.filter(_asyncio_record(wrapped)) is False


def test_asyncio_report_of_a_tensorstore_error_without_orbax_frames_is_kept_off_the_console():
    noise = OrbaxNoise()
    exc = ValueError('OUT_OF_RANGE: Error reading "ema.x/0.0" in OCDBT database at local file "/ckpt/12/state/"')
    record = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "Future exception was never retrieved", None,
                               (ValueError, exc, None))
    assert noise.filter(record) is False


def test_other_reports_pass():
    noise = OrbaxNoise()
    assert noise.filter(_asyncio_record(_raise_from("/home/user/project/reader.py"))) is True
    plain = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "Task was destroyed but it is pending!", None,
                              None)
    assert noise.filter(plain) is True
    assert noise.filter(logging.LogRecord("absl", logging.WARNING, __file__, 1, "a warning", None, None)) is True
    assert noise.counts == {}


def test_unraisable_from_orbax_is_counted_and_others_reach_the_previous_hook():
    seen = []
    previous, sys.unraisablehook = sys.unraisablehook, seen.append
    try:
        with OrbaxNoise() as noise:
            exc = _raise_from(os.path.join(os.sep, "x", "orbax", "y.py"))
            sys.unraisablehook(type("U", (), dict(exc_value=exc, exc_traceback=exc.__traceback__, object=None)))
            other = _raise_from("/home/user/z.py")
            sys.unraisablehook(type("U", (), dict(exc_value=other, exc_traceback=other.__traceback__, object=None)))
    finally:
        sys.unraisablehook = previous
    assert sum(noise.counts.values()) == 1 and len(seen) == 1 and seen[0].exc_value is other
