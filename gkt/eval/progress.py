"""A dependency-free progress bar on stderr: redrawn in place on a terminal, a line every 30 s otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    def __init__(self, total: int, done: int = 0, stream: TextIO | None = None, width: int = 24) -> None:
        self.total, self.done, self.width = total, done, width
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self.new = 0  # items answered in this process (the ETA uses only these)
        self._last_line = 0.0

    def advance(self, note: str) -> None:
        self.done += 1
        self.new += 1
        self._draw(note, force=self.done == self.total)

    def _draw(self, note: str, force: bool = False) -> None:
        now = time.monotonic()
        if not self.tty and not force and now - self._last_line < 30:
            return
        self._last_line = now
        frac = self.done / self.total if self.total else 1.0
        filled = int(frac * self.width)
        elapsed = now - self.start
        eta = elapsed / self.new * (self.total - self.done) if self.new else 0.0
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{_duration(elapsed)} elapsed, ETA {_duration(eta)}  {note}")
        if self.tty:
            self.stream.write("\r\033[K" + line[:160])
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
