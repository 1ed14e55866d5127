"""Run every benchmarks/bench_*.py module's ``run(report)`` and append the results to BENCHMARKS.md.

    python -m benchmarks.run                 # all of them
    python -m benchmarks.run merge stream    # only bench_merge.py and bench_stream.py
    python -m benchmarks.run --no-write      # print, do not touch BENCHMARKS.md

A benchmark that fails is reported as failed and the others still run; the exit status is 1 then.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

from benchmarks.report import BENCHMARKS_MD, Report

HERE = Path(__file__).resolve().parent


def discover() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {discover()})")
    parser.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument("--out", type=Path, default=BENCHMARKS_MD, help="file to append to")
    args = parser.parse_args(argv)
    names = args.names or discover()
    unknown = sorted(set(names) - set(discover()))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; have {discover()}")

    report = Report()
    print(f"machine: {report.machine}\ncommit: {report.commit}", flush=True)
    failed = []
    for name in names:
        t0 = time.perf_counter()
        print(f"\n=== bench_{name} ===", flush=True)
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            module.run(report)
        except Exception:
            failed.append(name)
            report(f"FAILED:\n\n```\n{traceback.format_exc(limit=5)}```", title=f"bench_{name}")
        print(f"=== bench_{name}: {time.perf_counter() - t0:.1f} s ===", flush=True)
    if not args.no_write:
        report.append_to(args.out)
        print(f"\nappended to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
