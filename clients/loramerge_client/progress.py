"""A progress bar for merges being built, drawn from the Merge stream's progress events.

On a terminal it redraws one line on stderr; elsewhere (pipes, CI logs) it stays silent unless
forced, so scripts get plain output.
"""

from __future__ import annotations

import sys
from typing import TextIO

from loramerge.v1 import merge_pb2

WIDTH = 28


def render(stage: str, done: int, total: int, width: int = WIDTH) -> str:
    """One line: stage, a bar of ``width`` cells filled done/total, and the counts."""
    frac = min(1.0, done / total) if total else 0.0
    filled = round(frac * width)
    return f"{stage:<14} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


class ProgressBar:
    """Callable taking MergeProgress events; ``close()`` ends the line. ``enabled`` None = auto (tty)."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self.tty = _isatty(self.stream)
        self.events = 0
        self._last_stage = ""
        self._width = 0

    def __call__(self, progress: merge_pb2.MergeProgress) -> None:
        self.events += 1
        if not self.enabled:
            return
        line = render(progress.stage or "merging", progress.done, progress.total)
        if self.tty:
            pad = " " * max(0, self._width - len(line))
            self.stream.write(f"\r{line}{pad}")
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
