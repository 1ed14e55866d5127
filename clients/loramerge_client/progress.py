"""A progress bar for merges being built, drawn from the Merge stream's progress events.

On a terminal it redraws one line on stderr; elsewhere (pipes, CI logs) it stays silent unless
forced, so scripts get plain output. While a stage runs the line shows what it counts (the merge
stage counts modules, the load stage adapters) and an ETA from the stage's rate so far.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from loramerge.v1 import merge_pb2

WIDTH = 28
CLEAR_LINE = "\x1b[K"  # erase to the end of the line (ANSI)
UNITS = {"merge": "modules", "load": "adapters"}  # what each stage of the merge service counts


def render(
    stage: str, done: int, total: int, width: int = WIDTH, *, unit: str = "", eta: float | None = None
) -> str:
    """One line: stage, a bar of ``width`` cells filled done/total, and the counts; while the stage
    runs (done < total), also what it counts and the estimated seconds left."""
    frac = min(1.0, done / total) if total else 0.0
    filled = round(frac * width)
    line = f"{stage:<14} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
    if done < total:
        if unit:
            line += f" {unit}"
        if eta is not None:
            line += f", ETA {format_eta(eta)}"
    return line


def format_eta(seconds: float) -> str:
    """``0:07``, ``4:05``, ``1:02:03``."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Eta:
    """Seconds left in a stage, from its rate since its first event (None until it has one)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._stage: str | None = None
        self._start = (0.0, 0)

    def __call__(self, stage: str, done: int, total: int) -> float | None:
        now = self._clock()
        if stage != self._stage or done < self._start[1]:
            self._stage, self._start = stage, (now, done)
            return None
        t0, done0 = self._start
        if done <= done0 or now <= t0:
            return None
        return (total - done) * (now - t0) / (done - done0)


class ProgressBar:
    """Callable taking MergeProgress events; ``close()`` ends the line. ``enabled`` None = auto (tty)."""

    def __init__(
        self,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream or sys.stderr
        self._eta = Eta(clock)
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self.tty = _isatty(self.stream)
        self.events = 0
        self._last_stage = ""
        self._width = 0

    def __call__(self, progress: merge_pb2.MergeProgress) -> None:
        self.events += 1
        eta = self._eta(progress.stage, progress.done, progress.total)
        if not self.enabled:
            return
        line = render(
            progress.stage or "merging",
            progress.done,
            progress.total,
            unit=UNITS.get(progress.stage, ""),
            eta=eta,
        )
        if self.tty:
            self.stream.write(f"\r{CLEAR_LINE}{line}")  # cleared first: a shorter line leaves nothing behind
            self._width = len(line)
        elif progress.stage != self._last_stage or progress.done == progress.total:
            self.stream.write(line + "\n")  # forced on a pipe: a line per stage and at its end
        self._last_stage = progress.stage
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
