"""``loramerge merge``: merge adapters offline, on this machine, into a PEFT directory.

No service is involved: the same ``Merger`` the merge service runs reads local directories or hub
repos, merges module by module (on CUDA when present with --device auto) and writes the result
atomically. Prints a summary; exits 2 with one line on stderr for bad input. The engine ships with the
services' distribution, not the client's: without it the command says what to install.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from loramerge.errors import InvalidArgument, LoramergeError, NotFound
from loramerge.v1 import merge_pb2
from loramerge_client.commands.installed import require_engine
from loramerge_client.commands.output import EXIT_OK, add_json_option, command, human_bytes, table
from loramerge_client.progress import ProgressBar
from loramerge_client.types import enum_choices

if TYPE_CHECKING:
    from merge_service.sources.base import ResolvedSource
    from merge_service.spec import AdapterRef


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "merge",
        help="merge adapters locally into a PEFT directory (no service needed)",
        description=(
            "Merge LoRA adapters on this machine and write a PEFT adapter directory that PEFT and vLLM "
            "load. Each SOURCE is a local adapter directory or a hub repo id, with an optional @REVISION "
            "and :WEIGHT (default 1), e.g. ./math:0.7 or org/code@main:0.3."
        ),
    )
    p.add_argument(
        "-a",
        "--adapter",
        action="append",
        required=True,
        metavar="SOURCE[@REVISION][:WEIGHT]",
        help="an adapter to merge; repeat for each",
    )
    p.add_argument(
        "--weights",
        metavar="W1,W2,...",
        help="weights for the adapters in order, instead of :WEIGHT suffixes (one per --adapter)",
    )
    p.add_argument(
        "--strategy",
        default="linear",
        choices=enum_choices(merge_pb2.MergeStrategy),
        help="merge strategy [linear]",
    )
    p.add_argument(
        "--density", type=float, help="fraction of values kept, in (0, 1]; required but for linear"
    )
    p.add_argument(
        "--majority-sign-method",
        "--sign-method",
        dest="sign_method",
        default="total",
        choices=enum_choices(merge_pb2.MajoritySignMethod),
        help="TIES sign election [total]",
    )
    p.add_argument("--seed", "--merge-seed", dest="seed", type=int, help="seed of DARE's masks [derived]")
    p.add_argument(
        "--space",
        default="delta",
        choices=enum_choices(merge_pb2.MergeSpace),
        help="delta: merge ΔW exactly (any ranks); factors: merge A and B separately (LoRAX) [delta]",
    )
    p.add_argument("--target-rank", type=int, default=0, help="rank of the result [exact, or Σ ranks]")
    p.add_argument("--max-rank", type=int, default=0, help="cap the rank, compressing to it [no cap]")
    p.add_argument("--dtype", default="float32", choices=enum_choices(merge_pb2.Dtype), help="output dtype")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] [auto: CUDA when present]")
    p.add_argument("--hub-token", help="token for private hub repos [$HF_TOKEN]")
    p.add_argument("-o", "--out", required=True, type=Path, help="output directory (created atomically)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bar [on a terminal]")
    add_json_option(p)
    p.set_defaults(func=run)
    return p


def split_weight(text: str) -> tuple[str, float | None]:
    """(source, weight) of SOURCE[:WEIGHT]; the weight only when what follows the last ':' is a number."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, None


def parse_adapter(text: str, index: int) -> AdapterRef:
    """SOURCE[@REVISION][:WEIGHT]; the revision only when the text is not an existing local path."""
    from merge_service.spec import AdapterRef, SourceKind

    field = f"--adapter[{index}]"
    source, w = split_weight(text)
    weight = 1.0 if w is None else w
    revision = ""
    if not Path(source).exists() and "@" in source:
        source, _, revision = source.rpartition("@")
        if not revision:
            raise InvalidArgument(f"{field}: empty revision after '@' in {text!r}", field=field)
    if not source:
        raise InvalidArgument(f"{field}: empty adapter source in {text!r}", field=field)
    kind = SourceKind.LOCAL if Path(source).is_dir() else SourceKind.HUB
    if kind == SourceKind.LOCAL and revision:
        raise InvalidArgument(f"{field}: a revision applies to hub repos, not local {source!r}", field=field)
    if kind == SourceKind.HUB and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise NotFound(f"{field}: no adapter directory at {source!r}", field=field)
    return AdapterRef(id=source, source=kind, revision=revision, weight=weight)


def apply_weights(refs: tuple[AdapterRef, ...], args: argparse.Namespace) -> tuple[AdapterRef, ...]:
    if args.weights is None:
        return refs
    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise InvalidArgument(
            f"--weights must be numbers separated by commas, got {args.weights!r}", field="--weights"
        ) from None
    if len(weights) != len(refs):
        raise InvalidArgument(
            f"--weights has {len(weights)} values for {len(refs)} adapters, got {args.weights!r}",
            field="--weights",
        )
    if any(split_weight(text)[1] is not None for text in args.adapter):
        raise InvalidArgument(
            "give weights either as :WEIGHT suffixes or with --weights, not both", field="--weights"
        )
    return tuple(dataclasses.replace(r, weight=w) for r, w in zip(refs, weights, strict=True))


class LocalPathResolver:
    """Local directories anywhere (each resolved under its own parent) and hub repos."""

    def __init__(self, hub_token: str | None = None) -> None:
        from merge_service.sources import SourceResolver

        self.hub = SourceResolver(adapter_root=None, hub_token=hub_token)

    def resolve(self, ref: AdapterRef, field: str = "adapter") -> ResolvedSource:
        from merge_service.sources import LocalSource
        from merge_service.spec import SourceKind

        if ref.source != SourceKind.LOCAL:
            return self.hub.resolve(ref, field=field)
        path = Path(ref.id).expanduser().resolve()
        local = LocalSource(path.parent)
        try:
            src = local.resolve(dataclasses.replace(ref, id=path.name))
        except LoramergeError as e:
            raise type(e)(e.message, field=field) from None
        return dataclasses.replace(src, id=ref.id)


@command
def run(args: argparse.Namespace) -> int:
    require_engine("loramerge merge")
    from merge_service.output import write_peft_dir
    from merge_service.pipeline import Merger
    from merge_service.spec import Dtype, MergeSpec, SignMethod, Space, Strategy

    refs = apply_weights(tuple(parse_adapter(text, i) for i, text in enumerate(args.adapter)), args)
    spec = MergeSpec(
        adapters=refs,
        strategy=Strategy(args.strategy),
        density=args.density,
        sign_method=SignMethod(args.sign_method),
        seed=args.seed,
        space=Space(args.space),
        target_rank=args.target_rank,
        dtype=Dtype(args.dtype),
        max_rank=args.max_rank,
    )
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise InvalidArgument(
            f"--out {str(out)!r} exists and is not empty (use --force to replace it)", field="--out"
        )
    t0 = time.perf_counter()
    merger = Merger(LocalPathResolver(args.hub_token), device=args.device)
    plan = merger.plan(spec)
    show = sys.stderr.isatty() if args.progress is None else args.progress
    with ProgressBar(enabled=show and not args.json) as bar:
        built = merger.build(
            plan,
            progress=lambda stage, done, total: bar(
                merge_pb2.MergeProgress(stage=stage, done=done, total=total)
            ),
        )
    write_peft_dir(built, out, overwrite=args.force)
    seconds = time.perf_counter() - t0
    worst = max(built.modules, key=lambda m: m.relative_error)
    summary = {
        "out": str(out),
        "merge_key": built.merge_key,
        "rank": built.rank,
        "bytes": len(built.data),
        "sha256": built.sha256,
        "seconds": round(seconds, 3),
        "device": built.device,
        "seed": plan.spec.seed,
        "worst_module": worst.name,
        "worst_relative_error": worst.relative_error,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    rows = [
        ("wrote", str(out)),
        ("merge key", built.merge_key),
        ("rank", str(built.rank)),
        ("size", f"{human_bytes(len(built.data))} ({len(built.data)} bytes)"),
        ("time", f"{seconds:.2f} s on {built.device}"),
        ("worst error", f"{worst.relative_error:.3g} ({worst.name})"),
    ]
    if plan.spec.seed is not None:
        rows.insert(3, ("seed", str(plan.spec.seed)))
    print(table(rows))
    return EXIT_OK
