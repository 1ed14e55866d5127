"""``loramerge plan``: what a merge spec resolves to (merge key, revisions, rank, size, cached or
not), from the merge service, without building anything."""

from __future__ import annotations

import argparse

from loramerge.v1 import merge_pb2
from loramerge_client.commands.connection import add_connection_options, merge_client
from loramerge_client.commands.output import EXIT_OK, add_json_option, command, human_bytes, print_json, table
from loramerge_client.commands.spec_options import add_spec_options, spec_from_args
from loramerge_client.types import enum_name


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan",
        help="show what a merge spec resolves to, and whether it is cached",
        description="Resolve adapters and revisions and show the merge the service would build.",
    )
    add_spec_options(p)
    p.add_argument(
        "--interference",
        action="store_true",
        help="also report how the adapters interfere: cosine of their ΔW, sign conflicts among their "
        "top-density entries, relative norms (per pair, overall and per module)",
    )
    p.add_argument("--modules", action="store_true", help="with --interference: one row per module as well")
    add_json_option(p)
    add_connection_options(p, merge=True, inference=False)
    p.set_defaults(func=run)
    return p


def describe_spec(spec: merge_pb2.MergeSpec) -> str:
    """One line: strategy, density, sign method, space, seed, rank, dtype."""
    parts = [enum_name(merge_pb2.MergeStrategy, spec.merge_strategy, "linear")]
    if spec.HasField("density"):
        parts.append(f"density {spec.density:g}")
    parts.append(f"sign {enum_name(merge_pb2.MajoritySignMethod, spec.majority_sign_method, 'total')}")
    parts.append(f"space {enum_name(merge_pb2.MergeSpace, spec.space, 'delta')}")
    if spec.HasField("seed"):
        parts.append(f"seed {spec.seed}")
    parts.append(f"target rank {spec.target_rank or 'exact'}")
    parts.append(enum_name(merge_pb2.Dtype, spec.dtype, "float32"))
    return ", ".join(parts)


def render_plan(plan: merge_pb2.PlanResponse, *, modules: bool = False) -> str:
    head = table(
        [
            ("merge key", plan.merge_key),
            ("cached", "yes" if plan.cached else "no"),
            ("base model", plan.base_model),
            ("rank", str(plan.rank)),
            ("size", f"{human_bytes(plan.estimated_bytes)} (estimated)"),
            ("merge", describe_spec(plan.effective_spec)),
        ]
    )
    rows = [("adapter", "source", "revision", "weight", "rank", "alpha", "digest")]
    for a in plan.adapters:
        alpha = f"{a.alpha:g}" + (" rslora" if a.use_rslora else "")
        source = enum_name(merge_pb2.AdapterSource, a.source, "auto")
        rows.append((a.id, source, a.revision[:12], f"{a.weight:g}", str(a.rank), alpha, a.digest[:16]))
    text = f"{head}\n\n{table(rows)}"
    if plan.HasField("interference"):
        text += "\n\n" + render_interference(plan, modules=modules)
    return text


def render_interference(plan: merge_pb2.PlanResponse, *, modules: bool = False) -> str:
    """Per pair: cosine, norm ratio, sign conflict and top-set overlap, overall (and per module)."""
    rep = plan.interference
    ids = [a.id for a in plan.adapters]
    norms = ", ".join(f"{i} {n:.4g}" for i, n in zip(ids, rep.adapter_norms, strict=False))
    lines = [
        f"interference (top sets at density {rep.density:g}, sign statistics on at most "
        f"{rep.max_sampled_entries} sampled entries per module; {rep.seconds * 1000:.0f} ms)",
        f"‖ΔW‖ (weights included): {norms}",
    ]
    rows = [("pair", "module", "cosine", "norm ratio", "sign conflict", "top overlap")]
    for p in rep.pairs:
        pair = f"{ids[p.first]} / {ids[p.second]}"
        for s in [p.overall, *(p.modules if modules else [])]:
            rows.append(
                (
                    pair,
                    s.module or "(all)",
                    f"{s.cosine:+.3f}",
                    f"{s.norm_ratio:.3g}",
                    f"{s.sign_conflict:.1%}",
                    f"{s.top_overlap:.1%}",
                )
            )
    return "\n".join(lines) + "\n" + table(rows)


@command
def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    with merge_client(args) as client:
        plan = client.plan(spec, interference=args.interference)
    if args.json:
        print_json(plan)
    else:
        print(render_plan(plan, modules=args.modules))
    return EXIT_OK
