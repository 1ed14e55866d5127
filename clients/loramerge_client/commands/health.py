"""``loramerge health``: the grpc.health.v1 status of the merge and/or inference service."""

from __future__ import annotations

import argparse

from loramerge.errors import LoramergeError
from loramerge_client.commands.connection import add_connection_options, inference_client, merge_client
from loramerge_client.commands.output import (
    EXIT_OK,
    EXIT_UNAVAILABLE,
    add_json_option,
    command,
    print_json,
    report_error,
    table,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "health",
        help="check that the services are serving",
        description="Exit status 0 when every service asked about is SERVING, 3 otherwise.",
    )
    p.add_argument(
        "--service", choices=("all", "merge", "inference"), default="all", help="which service [all]"
    )
    add_json_option(p)
    add_connection_options(p, merge=True, inference=True)
    p.set_defaults(func=run, timeout=10.0, retries=0)
    return p


@command
def run(args: argparse.Namespace) -> int:
    wanted = ("merge", "inference") if args.service == "all" else (args.service,)
    results: list[dict[str, str]] = []
    for name in wanted:
        make, address = (
            (merge_client, args.merge_addr) if name == "merge" else (inference_client, args.inference_addr)
        )
        entry = {"service": name, "address": address}
        try:
            with make(args) as client:
                entry["status"] = client.health()
        except LoramergeError as err:
            entry["status"] = err.code.name
            entry["error"] = err.message
            if not args.json:
                report_error(err)
        results.append(entry)
    if args.json:
        print_json(results)
    else:
        print(table([(r["service"], r["address"], r["status"]) for r in results]))
    return EXIT_OK if all(r["status"] == "SERVING" for r in results) else EXIT_UNAVAILABLE
