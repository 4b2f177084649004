"""A progress bar per phase on stderr: ``invert   12/30 [#####.....] 00:41 < 01:02``."""
from __future__ import annotations

import sys
import time


_OPEN: list = []  # the streams whose last write is a bar's unfinished line (``end_line`` ends it)


def end_line() -> None:
    """End a bar's unfinished line, so that the next message (an error, Ctrl-C's line, a note) starts a line of its
    own instead of being glued to ``jobs 1/6 [####....] 00:13 < 01:06``."""
    while _OPEN:
        stream = _OPEN.pop()
        try:
            stream.write("\n")
            stream.flush()
        except (OSError, ValueError):  # a stream closed since (a test's capture)
            pass


def say(line: str) -> None:
    """A line on stderr (a note, an error) that starts its own line, after any bar's unfinished one."""
    end_line()
    print(line, file=sys.stderr, flush=True)


class Progress:
    def __init__(self, stream=sys.stderr, width: int = 24, enabled: bool = True):
        self.stream, self.width, self.enabled = stream, width, enabled
        self.phase, self.total, self.start = "", 0, 0.0

    def begin(self, phase: str, total: int) -> None:
        self.phase, self.total, self.start = phase, total, time.perf_counter()
        self.update(0)

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - done) if done else 0.0
        filled = self.width * done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        end = "\n" if done >= self.total else ""
        self.stream.write(f"\r{self.phase:<9}{done:>4}/{self.total:<4}[{bar}] {_mmss(elapsed)} < {_mmss(eta)}{end}")
        self.stream.flush()
        if end and self.stream in _OPEN:
            _OPEN.remove(self.stream)
        elif not end and self.stream not in _OPEN:
            _OPEN.append(self.stream)


def _mmss(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    return f"{m:02d}:{s:02d}"
