"""The ``loramerge`` command.

Exit status: 0 ok; 2 bad input (usage errors, INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION,
RESOURCE_EXHAUSTED, auth); 3 a service unavailable or a deadline passed; 1 anything else;
130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from loramerge.errors import LoramergeError
from loramerge_client.commands.output import report_error

# Order shown in --help. A module not present in this installation is skipped.
COMMANDS = ("generate", "merge", "plan", "inspect", "fetch", "health", "cache", "adapters", "eval", "tune")

EPILOG = """exit status: 0 ok, 2 bad input (usage, INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION,
RESOURCE_EXHAUSTED, PERMISSION_DENIED, UNAUTHENTICATED), 3 unavailable or deadline exceeded, 1 other.
Addresses default to $MERGE_ADDR / $INFERENCE_ADDR (127.0.0.1:50061 / 127.0.0.1:50051)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loramerge",
        description="Merge LoRA adapters and generate with them through the loramerge services.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module_name = f"loramerge_client.commands.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit with status 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except LoramergeError as err:
        return report_error(err, as_json=bool(getattr(args, "json", False)))


if __name__ == "__main__":
    sys.exit(main())
