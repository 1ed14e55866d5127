"""``loramerge fetch``: build (or fetch from cache) a merged adapter on the merge service, with a
progress bar while it is built; write it as a PEFT folder and/or push it into the inference service
(LoadAdapter) so that the first Generate with it needs no merge."""

from __future__ import annotations

import argparse
import sys

from loramerge.errors import InvalidArgument
from loramerge_client.commands.connection import add_connection_options, inference_client, merge_client
from loramerge_client.commands.output import EXIT_OK, add_json_option, command, human_bytes, print_json, table
from loramerge_client.commands.spec_options import add_spec_options, spec_from_args
from loramerge_client.progress import ProgressBar
from loramerge_client.types import to_json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "fetch",
        help="build a merged adapter on the merge service; save it and/or load it for inference",
        description="Stream a merged adapter from the merge service (verified by sha256; a broken "
        "stream is resumed). -o writes a PEFT folder; --load pushes it into the inference service.",
    )
    add_spec_options(p)
    p.add_argument("-o", "--output", metavar="DIR", help="write adapter_config.json + weights here")
    p.add_argument("--load", action="store_true", help="push the adapter into the inference service")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr [on when stderr is a terminal]",
    )
    add_json_option(p)
    add_connection_options(p, merge=True, inference=True)
    p.set_defaults(func=run)
    return p


@command
def run(args: argparse.Namespace) -> int:
    if not args.output and not args.load:
        raise InvalidArgument("nothing to do: give -o DIR and/or --load", field="--output")
    spec = spec_from_args(args)
    with merge_client(args) as client, ProgressBar(sys.stderr, args.progress) as bar:
        result = client.merge(spec, output_dir=args.output, on_progress=bar)
    loaded = None
    if args.load:
        with inference_client(args) as client:
            loaded = client.load_adapter(result)
    h = result.header
    if args.json:
        out = {"header": to_json(h), "output": args.output, "resumed": result.resumed}
        if loaded is not None:
            out["loaded"] = to_json(loaded)
        print_json(out)
        return EXIT_OK
    rows = [
        ("merge key", h.merge_key),
        ("cache hit", "yes" if h.cache_hit else f"no (built in {h.build_seconds:.2f} s)"),
        ("base model", h.base_model),
        ("rank", str(h.rank)),
        ("size", human_bytes(h.total_bytes)),
        ("sha256", h.sha256),
    ]
    if h.modules:
        worst = max(h.modules, key=lambda m: m.relative_error)
        rows.append(("max rel. error", f"{worst.relative_error:.2e} ({worst.name})"))
    if args.output:
        rows.append(("written to", args.output))
    if loaded is not None:
        state = "already loaded" if loaded.already_loaded else f"loaded in {loaded.load_ms:.0f} ms"
        rows.append(("inference", f"{loaded.name} ({state})"))
    print(table(rows))
    return EXIT_OK
