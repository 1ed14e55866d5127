"""Flags that describe a merge (``--adapter ID[:W]`` repeated, or ``--merge JSON``, plus strategy
knobs), shared by generate, plan and fetch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loramerge.errors import InvalidArgument
from loramerge.strategy_params import STRATEGIES
from loramerge.v1 import merge_pb2
from loramerge_client.types import (
    Adapter,
    dtype_value,
    sign_method_value,
    source_value,
    space_value,
    strategy_value,
    to_merge_spec,
)


def add_spec_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("merge")
    g.add_argument(
        "-a",
        "--adapter",
        action="append",
        default=[],
        metavar="ID[:W]",
        help="adapter id (hub repo, path under the service's adapter root, s3://...) with an optional "
        "weight; repeat to merge several",
    )
    g.add_argument(
        "--merge",
        metavar="JSON|@FILE|-",
        help="a whole MergeSpec as JSON (the grpcurl body shape), from a file with @FILE or stdin with -; "
        "flags below override its fields",
    )
    g.add_argument("--source", default="auto", help="where --adapter ids live: auto, hub, local, s3")
    g.add_argument("--revision", default="", help="hub revision for --adapter ids")
    g.add_argument("--strategy", metavar="NAME", help=f"merge strategy: {', '.join(STRATEGIES)} [linear]")
    g.add_argument("--density", type=float, help="fraction kept, in (0, 1]; required by all but linear")
    g.add_argument("--sign-method", metavar="NAME", help="majority sign: total or frequency [total]")
    g.add_argument("--space", metavar="NAME", help="delta (exact) or factors (LoRAX-compatible) [delta]")
    g.add_argument("--merge-seed", type=int, help="seed for DARE's masks [derived from the spec]")
    g.add_argument("--target-rank", type=int, help="rank of the merged adapter [exact]")
    g.add_argument("--dtype", metavar="NAME", help="float32, bfloat16 or float16 [float32]")


def _read_spec_text(text: str) -> str:
    if text == "-":
        return sys.stdin.read()
    if text.startswith("@"):
        return Path(text[1:]).read_text()
    return text


def has_spec(args: argparse.Namespace) -> bool:
    return bool(args.adapter or args.merge)


def spec_from_args(args: argparse.Namespace) -> merge_pb2.MergeSpec:
    """The MergeSpec the flags describe; InvalidArgument (naming the flag) when they do not."""
    if args.merge and args.adapter:
        raise InvalidArgument("give either --adapter or --merge, not both", field="--merge")
    if not has_spec(args):
        raise InvalidArgument(
            "no adapters: give --adapter ID[:W] (repeatable) or --merge JSON", field="--adapter"
        )
    if args.merge:
        spec = to_merge_spec(_read_spec_text(args.merge))
    else:
        adapters = [Adapter.parse(a, args.source, args.revision) for a in args.adapter]
        spec = merge_pb2.MergeSpec(adapters=[a.to_proto() for a in adapters])
    if args.strategy is not None:
        spec.merge_strategy = strategy_value(args.strategy, "--strategy")
    if args.density is not None:
        spec.density = args.density
    if args.sign_method is not None:
        spec.majority_sign_method = sign_method_value(args.sign_method, "--sign-method")
    if args.space is not None:
        spec.space = space_value(args.space, "--space")
    if args.merge_seed is not None:
        spec.seed = args.merge_seed
    if args.target_rank is not None:
        spec.target_rank = args.target_rank
    if args.dtype is not None:
        spec.dtype = dtype_value(args.dtype, "--dtype")
    source_value(args.source, "--source")  # a bad --source is an error even with --merge
    return spec


def merge_flags_given(args: argparse.Namespace) -> bool:
    """Whether any flag asks for a merge (so one --adapter still goes through the merge path)."""
    knobs = (
        args.strategy,
        args.density,
        args.sign_method,
        args.space,
        args.merge_seed,
        args.target_rank,
        args.dtype,
    )
    return any(k is not None for k in knobs)
