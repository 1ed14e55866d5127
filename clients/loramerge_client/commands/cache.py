"""``loramerge cache``: the merge service's cache (list entries, evict one or all)."""

from __future__ import annotations

import argparse

from loramerge.errors import InvalidArgument
from loramerge_client.commands.connection import add_connection_options, merge_client
from loramerge_client.commands.output import EXIT_OK, add_json_option, command, human_bytes, print_json, table


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("cache", help="list or evict the merge service's cached merges")
    p.add_argument("action", choices=("list", "evict"), nargs="?", default="list")
    p.add_argument("merge_key", nargs="?", default="", help="for evict: the merge key")
    p.add_argument("--all", action="store_true", help="for evict: every entry")
    add_json_option(p)
    add_connection_options(p, merge=True, inference=False)
    p.set_defaults(func=run)
    return p


@command
def run(args: argparse.Namespace) -> int:
    with merge_client(args) as client:
        if args.action == "evict":
            if bool(args.merge_key) == bool(args.all):
                raise InvalidArgument("evict needs a merge key or --all (not both)", field="merge_key")
            n = client.evict(args.merge_key, all=args.all)
            if args.json:
                print_json({"evicted": n})
            else:
                print(f"evicted {n}")
            return EXIT_OK
        resp = client.list_cached()
    if args.json:
        print_json(resp)
        return EXIT_OK
    rows = [("merge key", "bytes", "rank", "memory", "disk", "hits", "base model")]
    for e in resp.entries:
        mem, disk = "yes" if e.in_memory else "-", "yes" if e.on_disk else "-"
        rows.append((e.merge_key, human_bytes(e.bytes), str(e.rank), mem, disk, str(e.hits), e.base_model))
    print(table(rows))
    print(
        f"memory {human_bytes(resp.memory_bytes)} of {human_bytes(resp.memory_limit_bytes)}, "
        f"disk {human_bytes(resp.disk_bytes)} of {human_bytes(resp.disk_limit_bytes)}"
    )
    return EXIT_OK
