"""User errors: bad input a command reports as ONE line, `prog: error: <message>`, with exit status 2.

A user error is a problem with what the user gave a command — a missing, unreadable, truncated or corrupt file,
invalid JSON, a tensor of the wrong shape, a value out of range — not a bug of this code. Its message names the
file (and the key, record or line) so that it can be fixed without a traceback. entry_point.Command.run prints
it that way; `--debug` (every command) shows the traceback instead. Anything else (a TypeError in our code, an
OSError while writing in the middle of training, ...) keeps its traceback.

What counts (`is_user_error`):
  * UserError and its subclasses: safetensors_io.SafetensorsError, checkpoint_import.CheckpointMismatchError,
    schema.BadRecord, eval's BadRow / ResultsError, and anything raised with `raise UserError(f"{path}: ...")`;
  * json.JSONDecodeError (read_json wraps it into a UserError naming the file);
  * FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError: a path the user
    gave (or a file it should hold) is missing, of the wrong kind, already there or not accessible.
This module imports nothing heavy (the low-level readers import it).
"""

from __future__ import annotations

import json
import os

USER_ERROR_EXIT = 2  # as a bad command line
MAX_MESSAGE = 2000  # characters of the one error line; --debug shows the whole message


class UserError(ValueError):
    """Bad input of a command (a file, a key, a record, a value): one `prog: error: ...` line, exit status 2.

    The message should start with the file it is about (`path: what is wrong`). A ValueError, so code that
    handles a reader's ValueError keeps working."""

    exit_status = USER_ERROR_EXIT  # what a multi-process job tells the other processes (distributed.leave_job)


USER_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is bad input (one error line, exit 2) rather than a bug (a traceback)."""
    return isinstance(error, (UserError, json.JSONDecodeError, *USER_OS_ERRORS))


def describe(error: BaseException) -> str:
    """The one-line message of a user error: the file first, newlines folded, at most MAX_MESSAGE characters."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{os.fspath(error.filename)}: {error.strerror}"
        if error.filename2 is not None:
            text += f" (-> {os.fspath(error.filename2)})"
    elif isinstance(error, json.JSONDecodeError):
        text = f"invalid JSON: {error}"
    else:
        text = str(error) or type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = "".join(line + ("" if i == len(lines) - 1 else " " if line.endswith(":") else "; ")
                   for i, line in enumerate(lines))
    if len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE]} ... ({len(text) - MAX_MESSAGE} more characters; --debug shows them)"
    return text


def read_json(path, *, what: str = "JSON file"):
    """The parsed content of a JSON file. A missing file raises FileNotFoundError naming it; invalid JSON or
    non-UTF-8 bytes raise a UserError naming the file, line and column."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(e.errno, f"{e.strerror} ({what})", path) from e
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}: not a {what}: byte {e.start} (line {line}) is not UTF-8") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not a valid {what}: {e.msg} at line {e.lineno} column {e.colno}") from e
