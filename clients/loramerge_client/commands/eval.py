"""``loramerge eval``: score the base, each single adapter and merged configurations on a suite of
prompts with expected outputs, rank the merges for a goal, and write a table, JSON and a chart."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from loramerge.errors import InvalidArgument
from loramerge_client.aio import AsyncInferenceClient
from loramerge_client.commands.connection import _common, add_connection_options
from loramerge_client.commands.output import EXIT_OK, EXIT_OTHER, add_json_option, command
from loramerge_client.eval import (
    Config,
    Report,
    Row,
    baseline_configs,
    evaluate,
    grid,
    load_configs,
    load_suite,
    parse_goal,
)

EXAMPLE = """example:
  loramerge eval suite.json --grid facts,upper --strategies linear,ties,dare_ties \\
      --spaces delta,factors --weights 1,1 --weights 1.2,1 --densities 0.5,0.8 \\
      --goal min:facts,upper --out eval-report/"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="score merge configurations on a suite of prompts and recommend one",
        description="Run a suite (tasks: prompts, expected outputs, a scorer) against the inference "
        "service for the base model, every single adapter the suite names, and merged configurations "
        "(a grid and/or a file), then rank the merges for a goal.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("suite", help="suite JSON file")
    g = p.add_argument_group("configurations")
    g.add_argument("--grid", metavar="A,B[,...]", help="adapters to merge in a grid")
    g.add_argument("--strategies", default="linear", help="comma list [%(default)s]")
    g.add_argument("--spaces", default="delta", help="comma list: delta, factors [%(default)s]")
    g.add_argument(
        "--weights", action="append", default=[], metavar="W1,W2[,...]",
        help="one weight per grid adapter (repeatable) [1 each]",
    )  # fmt: skip
    g.add_argument("--densities", default="0.5", help="comma list, for density strategies [%(default)s]")
    g.add_argument("--seed", type=int, help="seed for the random (DARE) strategies")
    g.add_argument(
        "--target-ranks", default="0",
        help="comma list of merged ranks; 0 is the service's default (exact, or the sum of ranks) [0]",
    )  # fmt: skip
    g.add_argument("--configs", metavar="JSON", help="file with a list of merged configurations")
    g.add_argument("--no-baselines", action="store_true", help="skip the base model and single adapters")
    g.add_argument(
        "--own-tasks", action="store_true",
        help="run each merged configuration only on its own adapters' tasks (faster)",
    )  # fmt: skip
    r = p.add_argument_group("run and report")
    r.add_argument(
        "--goal", default="min",
        help="min | mean | min:TASKS | mean:TASKS | task:NAME [min over the merged adapters' tasks]",
    )  # fmt: skip
    r.add_argument("--limit", type=int, default=0, help="use the first N prompts of each task [all]")
    r.add_argument("--concurrency", type=int, default=8, help="requests in flight [%(default)s]")
    r.add_argument("--parallel-configs", type=int, default=2, help="configurations in flight [%(default)s]")
    r.add_argument("--out", metavar="DIR", help="write report.json, report.md and chart.png here")
    r.add_argument("--no-chart", action="store_true", help="skip the PNG charts")
    r.add_argument(
        "--pareto", metavar="TASK_X,TASK_Y",
        help="the two tasks of the Pareto scatter pareto.png [the goal's first two tasks]",
    )  # fmt: skip
    r.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    add_json_option(p)
    add_connection_options(p, merge=False, inference=True)
    p.set_defaults(func=run)
    return p


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgument(f"{what} must be comma-separated numbers, got {text!r}", field=what) from None


def configs_from_args(args: argparse.Namespace, suite_adapters: list[str]) -> list[Config]:
    configs: list[Config] = []
    if args.grid:
        adapters = [a.strip() for a in args.grid.split(",") if a.strip()]
        configs += grid(
            adapters,
            strategies=[s.strip() for s in args.strategies.split(",") if s.strip()],
            spaces=[s.strip() for s in args.spaces.split(",") if s.strip()],
            weights=[_floats(w, "--weights") for w in args.weights],
            densities=_floats(args.densities, "--densities"),
            seed=args.seed,
            target_ranks=[int(r) for r in _floats(args.target_ranks, "--target-ranks")],
        )
    if args.configs:
        configs += load_configs(args.configs)
    return configs


@command
def run(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite, limit=args.limit)
    merged = configs_from_args(args, suite.adapters())
    configs = ([] if args.no_baselines else baseline_configs(suite)) + merged
    if not configs:
        raise InvalidArgument(
            "nothing to evaluate: give --grid or --configs, or keep the baselines", field="--grid"
        )
    goal = parse_goal(args.goal, suite, configs)
    pareto = [t.strip() for t in args.pareto.split(",") if t.strip()] if args.pareto else None
    if pareto is not None:
        Report(suite, [], goal).pareto_tasks(pareto)  # check before anything runs
        if len(pareto) != 2:
            raise InvalidArgument(f"--pareto takes two tasks, got {args.pareto!r}", field="--pareto")

    def progress(done: int, total: int, row: Row) -> None:
        if args.quiet:
            return
        status = row.error or " ".join(f"{t}={v:.2f}" for t, v in row.scores.items())
        print(
            f"[{done}/{total}] {row.config.name}: {status} ({row.seconds:.1f}s)", file=sys.stderr, flush=True
        )

    async def go() -> list[Row]:
        async with AsyncInferenceClient(args.inference_addr, **_common(args)) as client:
            return await evaluate(
                client,
                suite,
                configs,
                concurrency=args.concurrency,
                parallel_configs=args.parallel_configs,
                on_config_done=progress,
                own_tasks_only=args.own_tasks,
            )

    rows = asyncio.run(go())
    report = Report(suite, rows, goal)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.to_terminal())
    if args.out:
        paths = report.write(args.out, chart=not args.no_chart, pareto=pareto)
        print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return EXIT_OTHER if any(r.error for r in rows) else EXIT_OK
