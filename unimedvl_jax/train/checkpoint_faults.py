"""Checkpoint faults: how a damaged, partial or unwritable checkpoint is recognised, set aside and reported.

* Committed: orbax writes `commit_success.txt` into a step directory (and into each item's directory) just before
  renaming `<step>.orbax-checkpoint-tmp` to `<step>`; a step directory without every marker never finished.
* Set aside, never deleted: a damaged step directory is renamed `<step>.corrupt` (`<step>.corrupt.1`, ... if taken),
  newer checkpoints skipped over by an explicit `train.restore_step` become `<step>.abandoned`. Neither name is a
  step for orbax. Partial `*.orbax-checkpoint-tmp*` directories (a save that was killed or failed) hold no
  restorable state and are removed on the next start.
* Errors name what failed in one line: the array whose read failed and the storage error for a restore; the OS
  cause, the path, the bytes a checkpoint needs against the free bytes, and the last intact checkpoint for a save.
  Their exit statuses (CheckpointRestoreError 4, CheckpointSaveError 5) are `unimedvl-train`'s.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
import warnings

import jax
import numpy as np

COMMIT_MARKER = "commit_success.txt"
TMP_MARKER = ".orbax-checkpoint-tmp"
ITEMS = ("state", "data")


class CheckpointError(RuntimeError):
    """A checkpoint fault that ends the run; `exit_status` is unimedvl-train's status for it."""

    exit_status = 1


class CheckpointRestoreError(CheckpointError):
    """No checkpoint could be restored as asked (damaged under on_corrupt_checkpoint=fail, a bad restore_step, or
    no intact checkpoint left)."""

    exit_status = 4


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (disk full, quota, permission, file-size limit, ...)."""

    exit_status = 5


# ----------------------------------------------------------------------------------------------------------
# what is on disk
# ----------------------------------------------------------------------------------------------------------
def step_dirs(directory: str) -> list[int]:
    """Steps with a `<step>/` directory in `directory`, ascending (committed or not)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def missing_commit_markers(step_dir: str) -> list[str]:
    """The commit markers a committed checkpoint has and `step_dir` lacks (relative paths)."""
    wanted = [COMMIT_MARKER] + [os.path.join(item, COMMIT_MARKER) for item in ITEMS]
    return [m for m in wanted if not os.path.exists(os.path.join(step_dir, m))]


def committed_steps(directory: str) -> list[int]:
    """Steps whose directory carries every commit marker, ascending."""
    return [s for s in step_dirs(directory) if not missing_commit_markers(os.path.join(directory, str(s)))]


def remove_partial_saves(directory: str) -> list[str]:
    """Delete the `*.orbax-checkpoint-tmp*` directories of unfinished saves; their names."""
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if TMP_MARKER in name and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def move_aside(directory: str, step: int, suffix: str) -> str:
    """Rename `<step>/` to `<step>.<suffix>` (or `.<suffix>.<n>` when taken); the new path."""
    target = os.path.join(directory, f"{step}.{suffix}")
    n = 0
    while os.path.exists(target):
        n += 1
        target = os.path.join(directory, f"{step}.{suffix}.{n}")
    os.replace(os.path.join(directory, str(step)), target)
    return target


# ----------------------------------------------------------------------------------------------------------
# disk space
# ----------------------------------------------------------------------------------------------------------
def checkpoint_nbytes(abstract_state) -> int:
    """Bytes of one checkpoint's arrays, from the train state's shapes and dtypes (compression not counted)."""
    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_state)))


def free_bytes(path: str) -> int:
    """Free bytes (for this user) on the filesystem holding `path` (its nearest existing ancestor)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return int(shutil.disk_usage(path).free)


def human(n: float) -> str:
    """Bytes as a short human-readable size (1.5 MB, 27.0 GB)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def space_warning(directory: str, nbytes: int, *, keep: int, existing: int, saves_left: int) -> str | None:
    """A one-line warning when `directory`'s filesystem cannot hold the checkpoints this run will keep, else None.

    At its peak a run holds `keep` checkpoints plus the one being written (orbax deletes the oldest only after the
    new one commits); `existing` of them are on disk already. keep <= 0 keeps all: the `saves_left` to come."""
    more = saves_left if keep <= 0 else min(keep + 1 - min(existing, keep), saves_left)
    if more <= 0:
        return None
    needed, free = more * nbytes, free_bytes(directory)
    if free >= needed:
        return None
    peak = "every checkpoint (train.keep_checkpoints=0)" if keep <= 0 else \
        f"train.keep_checkpoints={keep} + the one being written"
    return (f"checkpoints of this run need up to {human(nbytes)} each; {peak} need {human(needed)} more but "
            f"{directory} has {human(free)} free: saves will fail once the disk is full")


# ----------------------------------------------------------------------------------------------------------
# describing errors
# ----------------------------------------------------------------------------------------------------------
def _chain(e: BaseException) -> list[BaseException]:
    seen, out = set(), []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _first_line(text: str, limit: int = 400) -> str:
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[:limit] + "..."


_READ_ARRAY = re.compile(r'Error reading "([^"]+)"')


def describe_restore_error(e: BaseException) -> str:
    """`array <name>: <storage error>` for a failed array read (the name orbax stores it under), else the error's
    first line."""
    chain = _chain(e)
    for err in reversed(chain):  # the root cause names the array
        m = _READ_ARRAY.search(str(err))
        if m:
            name = m.group(1).rsplit("/", 1)[0]  # drop the chunk index ("kernel.value/0.0")
            return f"array {name}: {_first_line(err)}"
    root = chain[-1]
    return f"{type(root).__name__}: {_first_line(root)}"


_OS_CODE = re.compile(r"os_error_code='?(\d+)")
_WRITE_PATH = re.compile(r'(?:Failed writing|Error writing [^"]*"[^"]*" in OCDBT database at local file): "([^"]+)"')


def os_error_of(e: BaseException) -> tuple[int | None, str | None]:
    """(errno, path) of the OS failure behind a save error (Python OSError or a TensorStore write error)."""
    code = path = None
    for err in _chain(e):
        if isinstance(err, OSError) and err.errno:
            return err.errno, err.filename or path
        m = _OS_CODE.search(str(err))
        if m and code is None:
            code = int(m.group(1))
        p = _WRITE_PATH.search(str(err))
        if p and path is None:
            path = p.group(1)
    return code, path


_CAUSES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
           errno.EFBIG: "a file exceeds the process's file-size limit (RLIMIT_FSIZE)",
           errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.EROFS: "the filesystem is read-only"}


def describe_save_error(e: BaseException, *, step: int, directory: str, nbytes: int, last_intact: int | None,
                        details: str | None) -> str:
    """One line: the checkpoint, the cause, the path, bytes needed vs free, the last intact checkpoint."""
    code, path = os_error_of(e)
    if code is not None:
        name = errno.errorcode.get(code, str(code))
        cause = f"{_CAUSES.get(code, os.strerror(code))} ({name}: {os.strerror(code)})"
    else:
        cause = _first_line(str(_chain(e)[-1])) or type(e).__name__
    where = path or os.path.join(directory, f"{step}{TMP_MARKER}")
    last = (f"last intact checkpoint: {last_intact} ({os.path.join(directory, str(last_intact))}); rerunning "
            f"the same command resumes from it" if last_intact is not None else
            "no intact checkpoint: rerunning starts from step 0")
    line = (f"checkpoint {step} could not be written: {cause} writing {where}; a checkpoint needs up to "
            f"{human(nbytes)}, {human(free_bytes(directory))} free; {last}")
    return line + (f" (details: {details})" if details else "")


# ----------------------------------------------------------------------------------------------------------
# orbax's noise around a failed read or write
# ----------------------------------------------------------------------------------------------------------
# orbax's storage layer (TensorStore, its OCDBT format) raises from C++: such errors carry no orbax frames, only these
ORBAX_WORDS = ("orbax", "tensorstore", "ocdbt")


def _orbax_file(path: str | None) -> bool:
    """Whether a source file path lies inside the orbax package."""
    return f"{os.sep}orbax{os.sep}" in (path or "")


def _in_orbax(tb) -> bool:
    """Whether a traceback passes through orbax's source files."""
    while tb is not None:
        if _orbax_file(tb.tb_frame.f_code.co_filename):
            return True
        tb = tb.tb_next
    return False


def _raised_in_orbax(exc: BaseException | None) -> bool:
    """Whether `exc` or an exception it was raised from or during passed through orbax's source files."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _in_orbax(exc.__traceback__):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class OrbaxNoise(logging.Filter):
    """Keeps orbax's reports of one failed read or write off the console; the failure itself surfaces as one line.

    A failed write makes orbax log an ERROR with a traceback per array and thread; a failed read (or write) closes
    orbax's event loop under the other reads/writes in flight, and each of them then reports "Event loop is
    closed" (and, once collected, its own error) through sys.unraisablehook and the asyncio logger: thousands of
    tracebacks for one damaged or unwritable file. While installed (a context manager), those reports are
    counted and their first lines kept; other reports pass. After a failure `settle()` waits for the stragglers
    and `dump()` writes the error's traceback and the kept reports to a details file.

    `background_error` is the first exception an orbax background thread logged: a save failed on this process
    even while orbax still waits (in a barrier) for the other processes, which never finish theirs."""

    MAX_KEPT = 200

    def __init__(self):
        super().__init__()
        self.kept: list[str] = []
        self.counts: dict[str, int] = {}
        self.background_error: BaseException | None = None
        self.last = 0.0
        self._lock = threading.Lock()
        self._previous_hook = None
        self._loggers = [logging.getLogger("absl"), logging.getLogger("asyncio")]  # orbax logs through absl
        self._format = logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s")

    def _keep(self, kind: str, text: str | None = None) -> None:
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if text is not None and len(self.kept) < self.MAX_KEPT:
                self.kept.append(text)
            self.last = time.monotonic()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.name == "asyncio":  # e.g. "_GatheringFuture exception was never retrieved" of an abandoned read
            exc = record.exc_info[1] if record.exc_info else None
            text = f"{record.getMessage()} {exc}".lower()
            if not any(word in text for word in ORBAX_WORDS) and not _raised_in_orbax(exc):
                return True
        elif not _orbax_file(record.pathname):
            return True
        elif (record.exc_info and record.exc_info[1] is not None and self.background_error is None
              and threading.current_thread() is not threading.main_thread()):
            self.background_error = record.exc_info[1]
        self._keep(f"{record.name}: {_first_line(record.getMessage(), 120)}", self._format.format(record))
        return False

    def _unraisable(self, unraisable) -> None:
        exc, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
        if ("Event loop is closed" in str(exc) or _in_orbax(unraisable.exc_traceback)
                or (code is not None and _orbax_file(code.co_filename))):
            self._keep(f"{type(exc).__name__}: {_first_line(exc, 120)}")
        else:
            self._previous_hook(unraisable)

    def __enter__(self) -> OrbaxNoise:
        self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        for logger in self._loggers:
            logger.addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self._previous_hook
        for logger in self._loggers:
            logger.removeFilter(self)

    def settle(self, quiet_s: float = 0.3, limit_s: float = 10.0) -> None:
        """Wait until no straggler has reported for `quiet_s` (at most `limit_s`), collecting abandoned ones."""
        # the reads/writes the failure abandoned are never awaited; Python would warn once more at exit
        warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
        end = time.monotonic() + limit_s
        self.last = time.monotonic()
        while time.monotonic() < end:
            gc.collect()
            time.sleep(quiet_s / 3)
            if time.monotonic() - self.last >= quiet_s:
                return

    def dump(self, path: str, error: BaseException) -> str | None:
        """Write `error`'s traceback and the kept reports to `path` (or the temp directory when `path` cannot be
        written, e.g. on the full disk); the file written, or None."""
        with self._lock:
            lines = ["".join(traceback.format_exception(error)), "orbax reports kept off the console (count, first "
                     "line):"]
            lines += [f"{n:6d}  {kind}" for kind, n in sorted(self.counts.items(), key=lambda kv: -kv[1])]
            lines += ["", "the first of them in full:", *self.kept, ""]
            self.kept, self.counts = [], {}
        text = "\n".join(lines)
        for target in (path, os.path.join(tempfile.gettempdir(), f"unimedvl-{os.getpid()}-{os.path.basename(path)}")):
            try:
                with open(target, "w") as f:
                    f.write(text)
                return target
            except OSError:
                continue
        return None
