"""The progress line of an evaluation run: items done of the total, items/s and the ETA, on stderr.

On a terminal the line is redrawn in place; otherwise (a log file, a launcher's pipe) one line is written per
update, at most every `min_interval_s` seconds, plus the final one.
"""

from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    """H:MM:SS (or M:SS under an hour)."""
    seconds = int(round(max(seconds, 0.0)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Counts finished items against `total`; `advance(n)` redraws `label: done/total [bar] items/s ETA`."""

    def __init__(self, total: int, label: str, *, stream=None, enabled: bool = True, width: int = 24,
                 min_interval_s: float = 5.0, clock=time.monotonic):
        self.total, self.label, self.enabled, self.width = total, label, enabled, width
        self.stream = sys.stderr if stream is None else stream
        self.min_interval_s, self.clock = min_interval_s, clock
        self.done = 0
        self.start = clock()
        self._last_print = None
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def rate(self) -> float:
        """Items per second since the start (0 before the first item)."""
        elapsed = self.clock() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """The current progress line."""
        filled = self.width * self.done // self.total if self.total else self.width
        bar = "#" * filled + "." * (self.width - filled)
        rate = self.rate()
        eta = format_duration((self.total - self.done) / rate) if rate > 0 else "?"
        return (f"{self.label}: {self.done}/{self.total} [{bar}] {rate:.2f} items/s, "
                f"elapsed {format_duration(self.clock() - self.start)}, ETA {eta}")

    def advance(self, n: int) -> None:
        """Count n more finished items and redraw."""
        self.done += n
        if not self.enabled:
            return
        now = self.clock()
        last = self.done >= self.total
        if not self._tty and not last and self._last_print is not None \
                and now - self._last_print < self.min_interval_s:
            return
        self._last_print = now
        if self._tty:
            self.stream.write("\r" + self.line() + ("\n" if last else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()
