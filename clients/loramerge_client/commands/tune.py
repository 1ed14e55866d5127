"""``loramerge tune``: search merge configurations (weights, strategy, density, space, target rank)
with optuna's TPE against the live stack, and write the best one as a recipe entry plus a report."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from loramerge.errors import InvalidArgument
from loramerge.v1 import merge_pb2
from loramerge_client.aio import AsyncInferenceClient
from loramerge_client.commands.connection import _common, add_connection_options
from loramerge_client.commands.installed import require_extra
from loramerge_client.commands.output import EXIT_OK, EXIT_OTHER, add_json_option, command
from loramerge_client.eval import load_suite, merged_config, parse_goal
from loramerge_client.progress import ProgressBar
from loramerge_client.tune import (
    SearchSpace,
    TrialRecord,
    live_objective,
    load_scored,
    reusing,
    tune,
    write_recipe,
)
from loramerge_client.types import enum_choices

EXAMPLE = """example:
  loramerge tune suite.json --adapters facts,upper --goal min:facts,upper --trials 20 \\
      --seed 7 --study out/tune/study.db --recipe out/tune/recipes.yaml --out out/tune/"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    strategies = ",".join(enum_choices(merge_pb2.MergeStrategy))
    spaces = ",".join(enum_choices(merge_pb2.MergeSpace))
    p = subparsers.add_parser(
        "tune",
        help="search merge weights/strategy/density/space/rank for a goal (optuna TPE) and write a recipe",
        description="An eval-driven search over merge configurations of the given adapters: each trial "
        "merges and scores one configuration on the suite against the inference service.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("suite", help="suite JSON file (as for loramerge eval)")
    p.add_argument("--adapters", required=True, metavar="A,B[,...]", help="adapters to merge")
    p.add_argument(
        "--goal", default="min", help="min | mean | min:TASKS | mean:TASKS [min over the adapters' tasks]"
    )
    s = p.add_argument_group("search space")
    s.add_argument("--strategies", default=strategies, help="comma list [%(default)s]")
    s.add_argument("--spaces", default=spaces, help="comma list [%(default)s]")
    s.add_argument(
        "--weight-range", default="-1,2", metavar="LOW,HIGH", help="per-adapter weights [%(default)s]"
    )
    s.add_argument("--density-range", default="0.1,1", metavar="LOW,HIGH", help="[%(default)s]")
    s.add_argument("--target-ranks", default="0", help="comma list; 0 = the service's default [%(default)s]")
    s.add_argument(
        "--probe", type=float, default=0.2,
        help="start design: the exact sum, then each weight ± PROBE alone; 0: the sum only [%(default)s]",
    )  # fmt: skip
    r = p.add_argument_group("search")
    r.add_argument(
        "--trials", type=int, default=20, help="trial budget (>= 1), resumed trials included [%(default)s]"
    )
    r.add_argument("--patience", type=int, default=0, help="stop after N trials without improvement [off]")
    r.add_argument("--target", type=float, default=1.0, help="stop once the goal reaches this [%(default)s]")
    r.add_argument("--parallel", type=int, default=2, help="trials evaluated concurrently [%(default)s]")
    r.add_argument("--seed", type=int, default=0, help="sampler seed (and DARE's merge seed) [%(default)s]")
    r.add_argument(
        "--study", metavar="PATH", help="resumable study: sqlite:///x.db, x.db (RDB) or a journal file"
    )
    r.add_argument(
        "--study-name", default="", help="study name inside the storage [from suite, adapters, goal]"
    )
    r.add_argument("--limit", type=int, default=0, help="use the first N prompts of each task [all]")
    r.add_argument(
        "--reuse", metavar="REPORT",
        help="a loramerge eval report.json on the same suite: its merges count as trials unevaluated",
    )  # fmt: skip
    r.add_argument("--concurrency", type=int, default=8, help="requests in flight [%(default)s]")
    o = p.add_argument_group("output")
    o.add_argument(
        "--recipe", metavar="FILE", help="add the best configuration to this recipe file (.yaml or .json)"
    )
    o.add_argument("--recipe-name", default="", help="its name [tuned-A-B]")
    o.add_argument("--out", metavar="DIR", help="write tune.json, tune.md, history.png and pareto.png here")
    o.add_argument("--no-chart", action="store_true", help="skip the PNG charts")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    add_json_option(p)
    add_connection_options(p, merge=False, inference=True)
    p.set_defaults(func=run)
    return p


def _pair(text: str, what: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise InvalidArgument(f"{what} must be LOW,HIGH, got {text!r}", field=what) from None
    return lo, hi


def _list(text: str) -> tuple[str, ...]:
    return tuple(x.strip().lower().replace("-", "_") for x in text.split(",") if x.strip())


@command
def run(args: argparse.Namespace) -> int:
    require_extra("loramerge tune", "optuna", "yaml", "matplotlib")
    if args.trials < 1:
        raise InvalidArgument(f"--trials must be >= 1, got {args.trials}", field="--trials")
    if args.patience < 0:
        raise InvalidArgument(f"--patience must be >= 0, got {args.patience}", field="--patience")
    suite = load_suite(args.suite, limit=args.limit)
    try:
        ranks = tuple(int(x) for x in args.target_ranks.split(",") if x.strip())
    except ValueError:
        raise InvalidArgument(
            f"--target-ranks must be integers, got {args.target_ranks!r}", field="--target-ranks"
        ) from None
    space = SearchSpace(
        adapters=tuple(a.strip() for a in args.adapters.split(",") if a.strip()),
        weight_range=_pair(args.weight_range, "--weight-range"),
        strategies=_list(args.strategies),
        spaces=_list(args.spaces),
        density_range=_pair(args.density_range, "--density-range"),
        target_ranks=ranks,
        merge_seed=args.seed,
        probe=args.probe,
    )
    goal = parse_goal(args.goal, suite, [merged_config(space.adapters, [1.0] * len(space.adapters))])
    scored = load_scored(args.reuse, suite) if args.reuse else {}
    reused: list[str] = []
    bar = ProgressBar(enabled=False if args.quiet else None)

    def on_trial(rec: TrialRecord, done: int, total: int) -> None:
        if args.quiet:
            return
        if bar.tty:
            bar(merge_pb2.MergeProgress(stage="tune", done=done, total=total))
        else:
            status = rec.error or " ".join(f"{t}={v:.2f}" for t, v in rec.scores.items())
            print(
                f"[{done}/{total}] trial {rec.number} {rec.config.name}: {status}",
                file=sys.stderr,
                flush=True,
            )

    async def go():
        async with AsyncInferenceClient(args.inference_addr, **_common(args)) as client:
            return await tune(
                suite,
                goal,
                space,
                reusing(live_objective(client, suite, concurrency=args.concurrency), scored, reused),
                trials=args.trials,
                seed=args.seed,
                parallel=args.parallel,
                patience=args.patience,
                target=args.target,
                storage=args.study,
                study_name=args.study_name,
                on_trial=on_trial,
            )

    with bar:
        result = asyncio.run(go())
    name = args.recipe_name or "tuned-" + "-".join(space.adapters)
    if args.json:
        print(
            json.dumps({**result.to_dict(), "recipe": result.recipe(name) if result.best else None}, indent=2)
        )
    else:
        print(result.to_terminal())
    written = []
    if args.recipe and result.best is not None:
        written.append(write_recipe(args.recipe, result.recipe(name)))
    if args.out:
        written += list(result.write(args.out, chart=not args.no_chart).values())
    if args.reuse and not args.quiet:
        print(f"{len(reused)} of {len(result.trials)} trials scored from {args.reuse}", file=sys.stderr)
    if written and not args.quiet:
        print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return EXIT_OK if result.best is not None else EXIT_OTHER
