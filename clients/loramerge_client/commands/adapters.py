"""``loramerge adapters``: adapters loaded in the inference service (list, unload)."""

from __future__ import annotations

import argparse

from loramerge.errors import InvalidArgument, NotFound
from loramerge_client.commands.connection import add_connection_options, inference_client
from loramerge_client.commands.output import EXIT_OK, add_json_option, command, human_bytes, print_json, table


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("adapters", help="list or unload the inference service's loaded adapters")
    p.add_argument("action", choices=("list", "unload"), nargs="?", default="list")
    p.add_argument("key", nargs="?", default="", help="for unload: a merge key or a vLLM LoRA name")
    add_json_option(p)
    add_connection_options(p, merge=False, inference=True)
    p.set_defaults(func=run)
    return p


@command
def run(args: argparse.Namespace) -> int:
    with inference_client(args) as client:
        if args.action == "unload":
            if not args.key:
                raise InvalidArgument("unload needs a merge key or adapter name", field="key")
            done = client.unload_adapter(args.key) or client.unload_adapter(name=args.key)
            if not done:
                raise NotFound(f"no loaded adapter has merge key or name {args.key!r}", field="key")
            if args.json:
                print_json({"unloaded": True})
            else:
                print(f"unloaded {args.key}")
            return EXIT_OK
        resp = client.list_adapters()
    if args.json:
        print_json(resp)
        return EXIT_OK
    rows = [("name", "merge key", "rank", "size", "requests", "description")]
    for a in resp.adapters:
        rows.append(
            (a.name, a.merge_key[:16], str(a.rank), human_bytes(a.bytes), str(a.requests), a.description)
        )
    print(table(rows))
    print(
        f"{len(resp.adapters)} of at most {resp.max_loaded} loaded; "
        f"base {resp.base_model}, max rank {resp.max_lora_rank}"
    )
    return EXIT_OK
