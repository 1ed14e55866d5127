"""Collects benchmark results and writes them as one dated Markdown section of BENCHMARKS.md.

A benchmark's ``run(report)`` calls ``report(result)`` with a dataclass, an object with a
``markdown()`` method, or a string; ``report.table(...)`` formats rows for those that build their own.
The section header records the date, the machine (CPU model, cores, RAM, GPU), the command and the
git commit, so numbers are never read without their context.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _dataclass_markdown(obj: Any) -> str:
    rows = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, list | tuple) and len(v) > 8:
            v = f"{len(v)} values, first {', '.join(fmt(x) for x in v[:4])}, …"
        elif isinstance(v, list | tuple):
            v = ", ".join(fmt(x) for x in v)
        rows.append((f.name, fmt(v)))
    return table(("field", "value"), rows)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return None


def machine() -> str:
    """CPU model, cores, RAM and GPU in one line."""
    parts = [f"{cpu_model()}, {os.cpu_count()} cores"]
    ram = ram_gib()
    if ram:
        parts.append(f"{ram:.0f} GiB RAM")
    try:
        import torch

        if torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name(0)}")
        else:
            parts.append("no GPU")
        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        pass
    try:
        load = os.getloadavg()[0]
        parts.append(f"load average {load:.1f} at start")
    except OSError:
        pass
    return ", ".join(parts)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return out + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def default_command() -> str:
    """How this process was started, as a user would type it (``python -m`` form, BENCH_* variables)."""
    argv = list(sys.argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None and spec.name else ["python", argv[0]]
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith("BENCH_")]
    return " ".join([*env, *head, *(shlex.quote(a) for a in argv[1:])])


class Report:
    """Callable: ``report(result, title=None)`` records and prints one benchmark's results."""

    def __init__(self, command: str | None = None) -> None:
        self.started = dt.datetime.now(dt.UTC)
        self.command = command or default_command()
        self.machine = machine()
        self.commit = git_commit()
        self.sections: list[tuple[str, str]] = []

    def __call__(self, result: Any, title: str | None = None) -> None:
        title = title or getattr(result, "title", None) or type(result).__name__
        if isinstance(result, str):
            body = result
        elif hasattr(result, "markdown"):
            body = result.markdown()
        elif dataclasses.is_dataclass(result):
            body = _dataclass_markdown(result)
        else:
            body = f"```\n{result!r}\n```"
        self.sections.append((str(title), body))
        print(f"\n## {title}\n\n{body}\n", flush=True)

    table = staticmethod(table)

    def markdown(self) -> str:
        try:
            load_end = f", {os.getloadavg()[0]:.1f} at the end"
        except OSError:
            load_end = ""
        head = [
            f"# Run of {self.started:%Y-%m-%d %H:%M} UTC",
            "",
            f"- machine: {self.machine}{load_end}",
            f"- command: `{self.command}`",
            f"- commit: {self.commit}",
            "",
        ]
        body = [f"## {title}\n\n{text}\n" for title, text in self.sections]
        return "\n".join(head) + "\n" + "\n".join(body)

    def append_to(self, path: Path = BENCHMARKS_MD) -> None:
        path = Path(path)
        intro = "" if path.exists() else "# Benchmarks\n\nEach `make bench` run appends a section below.\n\n"
        with open(path, "a") as f:
            f.write(intro + self.markdown() + "\n")
