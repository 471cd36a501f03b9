"""Progress bars that suit where the output goes.

On a terminal: tqdm's live bar (rate and ETA). Anywhere else (a log file, CI, a pipe): plain lines, one at most
every ``interval_s`` seconds plus the last, each a complete tqdm status (count, percentage, rate, ETA, postfix)
with no carriage returns, so a log reads line by line.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, TextIO

from tqdm import tqdm

NON_TTY_INTERVAL_S = 30.0


class _PlainLines:
    """A file for tqdm that turns each redraw into its own line (drops the carriage returns and blank redraws)."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _ThrottledBar(tqdm):
    """tqdm whose explicit refreshes (``set_postfix``, ``total`` changes) are also held to ``mininterval``; once
    the count reaches the total, only `close` writes (one final line, with the last postfix)."""

    def refresh(self, nolock=False, lock_args=None):
        now = time.time()
        last = getattr(self, "_last_line_at", None)
        done = self.total is not None and self.n >= self.total
        if done or (last is not None and now - last < self.mininterval):
            return False
        self._last_line_at = now
        return super().refresh(nolock=nolock, lock_args=lock_args)


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable: Iterable | None = None, *, stream: TextIO | None = None,
                 interval_s: float = NON_TTY_INTERVAL_S, **kwargs) -> tqdm:
    """`tqdm(iterable, **kwargs)` on a terminal; elsewhere the same bar as plain lines every `interval_s` seconds
    (and at the end). `stream` defaults to stderr."""
    stream = sys.stderr if stream is None else stream
    if is_terminal(stream) or kwargs.get("disable"):
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.pop("dynamic_ncols", None)
    kwargs["leave"] = True  # a finished stage's last line stays in the log
    return _ThrottledBar(iterable, file=_PlainLines(stream), mininterval=interval_s, ascii=True, ncols=110, **kwargs)
