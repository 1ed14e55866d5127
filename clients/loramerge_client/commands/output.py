"""How subcommands print: plain text for people, ``--json`` for scripts, errors on stderr with
an exit status that tells bad input (2) from an unavailable server (3) from anything else (1)."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message

from loramerge.errors import LoramergeError
from loramerge_client.errors import exit_code_for
from loramerge_client.types import to_json

EXIT_OK = 0
EXIT_OTHER = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3

Command = Callable[[argparse.Namespace], int]


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON (proto field names) for scripts")


def print_json(obj: Message | dict[str, Any] | list[Any], *, indent: int | None = 2) -> None:
    data = to_json(obj) if isinstance(obj, Message) else obj
    print(json.dumps(data, indent=indent, sort_keys=False), flush=True)


def report_error(err: BaseException, *, as_json: bool = False) -> int:
    """Print ``err`` on stderr (its code, message and field violations) and return the exit status."""
    code = exit_code_for(err)
    if isinstance(err, LoramergeError):
        if as_json:
            body = {
                "error": {
                    "code": err.code.name,
                    "message": err.message,
                    "violations": [{"field": v.field, "description": v.description} for v in err.violations],
                }
            }
            print(json.dumps(body), file=sys.stderr)
        else:
            print(f"error: {err.code.name}: {err.message}", file=sys.stderr)
            for v in err.violations:
                if v.description != err.message:
                    print(f"  {v.field}: {v.description}", file=sys.stderr)
    else:
        print(f"error: {err}", file=sys.stderr)
    return code


def command(fn: Command) -> Command:
    """Wrap a subcommand so that domain errors and bad local files print cleanly with the right status."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        as_json = bool(getattr(args, "json", False))
        try:
            return fn(args)
        except LoramergeError as err:
            return report_error(err, as_json=as_json)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError) as err:
            report_error(err, as_json=as_json)
            return EXIT_BAD_INPUT
        except BrokenPipeError:  # `loramerge ... | head` closed the pipe: not an error
            return EXIT_OK

    return run


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns separated by two spaces."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
