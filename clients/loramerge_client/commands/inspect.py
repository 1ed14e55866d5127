"""``loramerge inspect``: an adapter's config, rank, target modules and size.

A local PEFT folder is read directly (config and safetensors header only, with the same checks the
merge service applies); any other id is resolved by the merge service (a one-adapter Plan), which
reports its source, pinned revision, digest, rank, alpha and modules.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path
from typing import Any

from loramerge.v1 import merge_pb2
from loramerge_client.commands.connection import add_connection_options, merge_client
from loramerge_client.commands.installed import require_engine
from loramerge_client.commands.output import EXIT_OK, add_json_option, command, human_bytes, print_json, table
from loramerge_client.types import Adapter, enum_name, to_json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect",
        help="show an adapter's config, rank, modules and size",
        description="Inspect a local PEFT adapter folder, or any adapter id through the merge service.",
    )
    p.add_argument(
        "adapter", help="a local folder (adapter_config.json + adapter_model.safetensors) or an id"
    )
    p.add_argument("--source", default="auto", help="for ids: auto, hub, local, s3")
    p.add_argument("--revision", default="", help="for hub ids: branch, tag or commit")
    p.add_argument(
        "--remote", action="store_true", help="ask the merge service even if a local folder exists"
    )
    add_json_option(p)
    add_connection_options(p, merge=True, inference=False)
    p.set_defaults(func=run)
    return p


def inspect_folder(folder: Path) -> dict[str, Any]:
    """Facts about a local adapter, checked like the merge service checks it (no tensor data read)."""
    from loramerge.peft import WEIGHTS_FILE
    from merge_service.adapter import check_structure, read_config, read_safetensors_header

    adapter_id = str(folder)
    config = read_config(folder, adapter_id)
    weights = folder / WEIGHTS_FILE
    try:
        size = os.stat(weights).st_size
        with open(weights, "rb") as f:
            tensors, _ = read_safetensors_header(f, size, adapter_id)
    except FileNotFoundError:
        from loramerge.errors import NotFound

        raise NotFound(f"adapter {adapter_id!r} has no {WEIGHTS_FILE}", field="adapter") from None
    modules = check_structure(tensors, config, adapter_id)
    ranks = {m: tensors[a].shape[0] for m, (a, _) in modules.items()}
    return {
        "path": str(folder),
        "base_model": config.base_model,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "target_modules": sorted(config.target_modules),
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "modules": len(modules),
        "module_types": dict(sorted(Counter(m.rsplit(".", 1)[-1] for m in modules).items())),
        "ranks": sorted(set(ranks.values())),
        "tensors": len(tensors),
        "dtypes": sorted({t.dtype for t in tensors.values()}),
        "parameters": sum(_numel(t.shape) for t in tensors.values()),
        "bytes": size,
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def render_local(info: dict[str, Any]) -> str:
    rows = [
        ("path", info["path"]),
        ("base model", info["base_model"]),
        ("rank", str(info["r"]) + (f" (per module: {info['ranks']})" if len(info["ranks"]) > 1 else "")),
        ("alpha", f"{info['lora_alpha']:g}" + (" (rsLoRA)" if info["use_rslora"] else "")),
        ("target modules", ", ".join(info["target_modules"])),
        ("modules", f"{info['modules']} ({', '.join(f'{k} x{v}' for k, v in info['module_types'].items())})"),
        ("tensors", f"{info['tensors']} ({', '.join(info['dtypes'])}), {info['parameters']:,} parameters"),
        ("size", human_bytes(info["bytes"])),
    ]
    return table(rows)


def render_remote(a: merge_pb2.ResolvedAdapter, estimated_bytes: int) -> str:
    rows = [
        ("id", a.id),
        ("source", enum_name(merge_pb2.AdapterSource, a.source, "auto")),
        ("revision", a.revision or "-"),
        ("digest", a.digest),
        ("base model", a.base_model),
        ("rank", str(a.rank)),
        ("alpha", f"{a.alpha:g}" + (" (rsLoRA)" if a.use_rslora else "")),
        ("target modules", ", ".join(a.target_modules)),
        ("size", f"{human_bytes(estimated_bytes)} (estimated, as served)"),
    ]
    return table(rows)


@command
def run(args: argparse.Namespace) -> int:
    folder = Path(args.adapter)
    if not args.remote and folder.is_dir():
        require_engine("loramerge inspect of a local folder (or ask the merge service with --remote)")
        info = inspect_folder(folder)
        if args.json:
            print_json(info)
        else:
            print(render_local(info))
        return EXIT_OK
    ref = Adapter(args.adapter, 1.0, args.source, args.revision).to_proto()
    with merge_client(args) as client:
        plan = client.plan(merge_pb2.MergeSpec(adapters=[ref]))
    resolved = plan.adapters[0]
    if args.json:
        out = to_json(resolved)
        out["estimated_bytes"] = int(plan.estimated_bytes)
        print_json(out)
    else:
        print(render_remote(resolved, plan.estimated_bytes))
    return EXIT_OK
