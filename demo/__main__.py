"""``make demo`` / ``python -m demo``: the whole loramerge workflow on locally built demo assets.

1. build (or reuse) the demo base model and its four adapters;
2. start the merge service and the inference service (vLLM) on loopback;
3. print the inventory;
4. send the same prompts to the base, each adapter and several merges, outputs side by side;
5. evaluate the base, every adapter and a grid of merges (``loramerge eval``), rank the merges of
   the pair built to merge, and check the pair built to conflict;
6. stop both services and say where the report and the chart are.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from demo.assets import CONFLICTING_PAIR, MERGEABLE_PAIR, REPO_ROOT, VARIANTS, DemoAssets
from demo.cache import ensure_assets
from demo.serve import interrupt_on_sigterm
from demo.services import DemoServices, running
from loramerge.strategy_params import STRATEGIES
from loramerge_client.aio import AsyncInferenceClient
from loramerge_client.eval import (
    Config,
    Suite,
    grid,
    load_suite,
    merged_config,
    single_configs,
)

SPACES = ("delta", "factors")


@dataclass(frozen=True)
class Plan:
    """How much the evaluation covers."""

    weights: tuple[tuple[float, float], ...] = ((1.0, 1.0), (1.2, 1.0), (1.0, 0.8))
    densities: tuple[float, ...] = (0.5, 0.8)
    limit: int = 0  # prompts per task; 0: all
    seed: int = 7
    tune_trials: int = 20  # loramerge tune on the mergeable pair; 0: skip


PLANS = {
    "full": Plan(),
    "small": Plan(weights=((1.0, 1.0), (1.2, 1.0), (1.0, 0.8)), densities=(0.7,), limit=20),
}


@dataclass
class DemoResult:
    out_dir: Path
    report: dict  # report.json
    paths: dict[str, Path]
    summary: dict = field(default_factory=dict)
    service_pids: list[int] = field(default_factory=list)  # each also leads its own process group


class Console:
    """Numbered steps and progress lines, flushed as they come."""

    def __init__(self, steps: int, stream=sys.stdout) -> None:
        self.steps, self.n, self.stream, self.t0 = steps, 0, stream, time.monotonic()

    def step(self, title: str) -> None:
        self.n += 1
        self.print(f"\n[{self.n}/{self.steps}] {title}  (+{time.monotonic() - self.t0:.0f}s)")

    def info(self, text: str) -> None:
        self.print(f"    {text}")

    def print(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)


def mergeable_grid(plan: Plan) -> list[Config]:
    return grid(
        MERGEABLE_PAIR,
        strategies=STRATEGIES,
        spaces=SPACES,
        weights=plan.weights,
        densities=plan.densities,
        seed=plan.seed,
    )


def conflicting_configs(plan: Plan) -> list[Config]:
    d = plan.densities[0]
    return [
        merged_config(CONFLICTING_PAIR, (1.0, 1.0), "linear", "delta"),
        merged_config(CONFLICTING_PAIR, (1.0, 1.0), "linear", "factors"),
        merged_config(CONFLICTING_PAIR, (1.0, 1.0), "ties", "delta", d, plan.seed),
        merged_config(CONFLICTING_PAIR, (1.0, 1.0), "dare_ties", "delta", d, plan.seed),
    ]


def side_by_side_configs(plan: Plan) -> list[tuple[str, Config]]:
    """(column label, configuration) for the side-by-side table."""
    base_and_singles = single_configs(MERGEABLE_PAIR + CONFLICTING_PAIR)
    d = plan.densities[0]
    merges = [
        ("f+u lin", merged_config(MERGEABLE_PAIR, (1.0, 1.0), "linear", "delta")),
        ("f+u fact", merged_config(MERGEABLE_PAIR, (1.0, 1.0), "linear", "factors")),
        ("f+u ties", merged_config(MERGEABLE_PAIR, (1.0, 1.0), "ties", "delta", d, plan.seed)),
        ("r+s lin", merged_config(CONFLICTING_PAIR, (1.0, 1.0), "linear", "delta")),
    ]
    return [(c.name, c) for c in base_and_singles] + merges


def inventory_lines(assets: DemoAssets) -> list[str]:
    inv = assets.inventory()
    b = inv["base_model"]
    lines = [
        f"base model  {b['name']}: Llama, {b['parameters'] / 1e6:.2f} M parameters "
        f"(hidden {b['hidden_size']}, {b['layers']} layers, {b['heads']} heads), {b['tokenizer']}",
        f"            skill: {b['skill']}",
        "",
        f"{'adapter':<9} {'rank':>4} {'alpha':>5}  {'modules':<44} {'base model':<20} skill",
    ]
    for a in inv["adapters"]:
        mods = ",".join(m.replace("_proj", "") for m in a["target_modules"])
        lines.append(
            f"{a['name']:<9} {a['rank']:>4} {a['alpha']:>5}  {mods:<44} {a['base_model']:<20} "
            f"{a['skill']}  e.g. {a['example']!r}"
        )
    lines += [
        "",
        f"built to merge: {' + '.join(inv['mergeable_pair'])} "
        "(each trained to stay neutral outside its prefix)",
        f"built to conflict: {' + '.join(inv['conflicting_pair'])} (trained on their own task only)",
    ]
    return lines


async def side_by_side(client: AsyncInferenceClient, suite: Suite, columns: list[tuple[str, Config]],
                       per_task: int = 2) -> list[str]:  # fmt: skip
    cases = [(t, c) for t in suite.tasks for c in t.cases[:per_task]]
    # One column at a time, so the service holds few adapters at once.
    outputs: dict[str, list[str]] = {}
    for label, cfg in columns:
        outputs[label] = [
            r.text
            for r in await asyncio.gather(
                *(client.generate(c.prompt, cfg.choice, suite.sampling, timeout=600) for _, c in cases)
            )
        ]
    widths = {label: max(len(label), 9) for label, _ in columns}
    pw = max(len(c.prompt) for _, c in cases)
    head = f"{'prompt':<{pw}}  {'expected':<9} " + " ".join(
        f"{label:<{widths[label]}}" for label, _ in columns
    )
    lines = [head, "-" * len(head)]
    for i, (task, case) in enumerate(cases):
        cells = []
        for label, _ in columns:
            out = outputs[label][i]
            mark = "+" if task.score(out, case) == 1.0 else " "
            cells.append(f"{(out[:8] + mark):<{widths[label]}}")
        lines.append(f"{case.prompt:<{pw}}  {case.expected:<9} " + " ".join(cells))
    lines.append("(+ marks an exact match; columns: " + ", ".join(label for label, _ in columns) + ")")
    return lines


def summarise(report: dict) -> dict:
    """What the evaluation (``report.json``) says about each pair: for the closing lines and tests."""
    rows = {r["name"]: r for r in report["rows"]}

    def pair_rows(pair: Sequence[str]) -> list[dict]:
        return [
            r
            for r in report["rows"]
            if r["kind"] == "merged" and r["params"]["adapters"] == list(pair) and not r["error"]
        ]

    def min_over(r: dict, pair: Sequence[str]) -> float:
        return min(r["scores"].get(t, math.nan) for t in pair)

    out: dict = {"single": {}, "pairs": {}}
    for name in MERGEABLE_PAIR + CONFLICTING_PAIR:
        if name in rows:
            out["single"][name] = rows[name]["scores"]
    for label, pair in (("mergeable", MERGEABLE_PAIR), ("conflicting", CONFLICTING_PAIR)):
        prs = sorted(pair_rows(pair), key=lambda r: -min_over(r, pair))
        if not prs:
            continue
        linear = {
            r["params"]["space"]: min_over(r, pair)
            for r in prs
            if r["params"]["strategy"] == "linear" and r["params"]["weights"] == [1.0, 1.0]
        }
        out["pairs"][label] = {
            "adapters": list(pair),
            "best": prs[0]["name"],
            "best_scores": prs[0]["scores"],
            "best_min": min_over(prs[0], pair),
            "linear_delta_min": linear.get("delta"),
            "linear_factors_min": linear.get("factors"),
            "configurations": len(prs),
        }
    out["failed"] = [r["name"] for r in report["rows"] if r["error"]]
    return out


def conclusion_lines(summary: dict) -> list[str]:
    lines = []
    m = summary["pairs"].get("mergeable")
    if m:
        a, b = m["adapters"]
        verdict = "keeps both skills" if m["best_min"] >= 0.5 else "does not keep both skills"
        lines.append(
            f"{a} + {b}: best merge {m['best']!r} {verdict} "
            f"({a} {m['best_scores'][a]:.2f}, {b} {m['best_scores'][b]:.2f})."
        )
        if m["linear_delta_min"] is not None and m["linear_factors_min"] is not None:
            lines.append(
                f"    linear at 1/1: exact delta space min {m['linear_delta_min']:.2f} vs factor space "
                f"{m['linear_factors_min']:.2f}."
            )
    c = summary["pairs"].get("conflicting")
    if c:
        a, b = c["adapters"]
        verdict = "they conflict" if c["best_min"] < 0.5 else "both skills survived"
        lines.append(
            f"{a} + {b}: best of {c['configurations']} merges {c['best']!r} keeps min {c['best_min']:.2f}: "
            f"{verdict}."
        )
    return lines


def demo_markdown(assets: DemoAssets, sbs: list[str], table_md: str, summary: dict, cli: str) -> str:
    parts = [
        "# loramerge demo report",
        "",
        f"Assets: `{assets.root}` (variant {assets.settings.variant}).",
        "",
        "## Inventory",
        "",
        "```",
        *inventory_lines(assets),
        "```",
        "",
        "## Same prompts, side by side",
        "",
        "```",
        *sbs,
        "```",
        "",
        "## Evaluation",
        "",
        "Run by `loramerge eval` (the conflicting pair's merges come from a configurations file):",
        "",
        "```",
        cli,
        "```",
        "",
        table_md,
        "",
        "## What happened",
        "",
        *[f"- {line.strip()}" for line in conclusion_lines(summary)],
        "",
    ]
    return "\n".join(parts)


def eval_argv(suite_path: Path, addr: str, plan: Plan, configs_path: Path, out: Path) -> list[str]:
    """The ``loramerge eval`` command line the demo runs."""
    argv = [
        "loramerge", "eval", str(suite_path), "--inference-addr", addr,
        "--grid", ",".join(MERGEABLE_PAIR),
        "--strategies", ",".join(STRATEGIES), "--spaces", ",".join(SPACES),
        *[x for w in plan.weights for x in ("--weights", ",".join(f"{v:g}" for v in w))],
        "--densities", ",".join(f"{d:g}" for d in plan.densities), "--seed", str(plan.seed),
        "--configs", str(configs_path),
        "--goal", "min:" + ",".join(MERGEABLE_PAIR), "--own-tasks",
        # Four configurations in flight fill the engine's four LoRA slots; each waits alone for its merge.
        "--concurrency", "32", "--parallel-configs", "4", "--timeout", "600", "--out", str(out),
    ]  # fmt: skip
    if plan.limit:
        argv += ["--limit", str(plan.limit)]
    return argv


def run_demo(
    variant: str = "full",
    out_dir: Path | None = None,
    *,
    plan: Plan | None = None,
    console: Console | None = None,
) -> DemoResult:
    plan = plan or PLANS[variant]
    out = (out_dir or REPO_ROOT / "out" / "demo").resolve()
    out.mkdir(parents=True, exist_ok=True)
    con = console or Console(7)

    con.step(f"Demo assets ({variant}): a tiny Llama and four LoRA adapters, built locally")
    t0 = time.monotonic()
    assets = ensure_assets(variant, log=con.info)
    con.info(f"ready in {time.monotonic() - t0:.0f}s at {assets.root}")

    con.step("Starting the merge service and the inference service (vLLM) on loopback")
    with running(assets, out / "services", progress=con.info) as services:
        con.info(f"merge service     {services.merge.address}   log {services.merge.log_path}")
        con.info(f"inference service {services.inference.address}   log {services.inference.log_path}")
        pids = [s.proc.pid for s in services.services if s.proc is not None]
        sbs, cli = _workflow(con, assets, services, plan, out)
        con.step("Stopping both services")
    con.info("stopped; nothing left running")

    report = json.loads((out / "report.json").read_text())
    summary = summarise(report)
    paths = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "chart": out / "chart.png",
        "demo": out / "demo.md",
        "summary": out / "summary.json",
    }
    paths["demo"].write_text(demo_markdown(assets, sbs, paths["markdown"].read_text(), summary, cli))
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    con.print()
    for line in conclusion_lines(summary):
        con.print(line)
    if summary["failed"]:
        con.print(f"configurations that failed: {', '.join(summary['failed'])} (see the report)")
    con.print(f"\nReport: {paths['demo']}  (table {paths['markdown']}, data {paths['json']})")
    con.print(f"Chart:  {paths['chart']}")
    return DemoResult(out, report, paths, summary, pids)


def openai_recipe_line(services: DemoServices, suite) -> str:
    """One call through the official OpenAI SDK, naming the served recipe as the model."""
    from openai import OpenAI

    case = suite.tasks[0].cases[0]
    sdk = OpenAI(base_url=f"{services.inference.http_url}/v1", api_key="demo", max_retries=0, timeout=600)
    answer = sdk.completions.create(
        model="facts-upper", prompt=case.prompt, max_tokens=suite.sampling.max_tokens or 16, temperature=0
    )
    return f"OpenAI SDK, model='facts-upper' (a recipe): {case.prompt!r} -> {answer.choices[0].text!r}"


def _workflow(con: Console, assets: DemoAssets, services: DemoServices, plan: Plan, out: Path):
    suite = load_suite(assets.suite_path, limit=plan.limit)

    con.step("Inventory")
    for line in inventory_lines(assets):
        con.info(line)

    con.step("The same prompts through the base, each adapter and four merges")

    async def side() -> list[str]:
        async with AsyncInferenceClient(services.inference.address, timeout=600) as client:
            return await side_by_side(client, suite, side_by_side_configs(plan))

    sbs = asyncio.run(side())
    for line in sbs:
        con.info(line)
    con.info(openai_recipe_line(services, suite))

    configs_path = out / "conflicting-configs.json"
    configs_path.write_text(json.dumps([c.params for c in conflicting_configs(plan)], indent=2) + "\n")
    argv = eval_argv(assets.suite_path, services.inference.address, plan, configs_path, out)
    n_merges = len(mergeable_grid(plan)) + len(conflicting_configs(plan))
    con.step(
        f"Evaluation: the base, {len(suite.adapters())} adapters and {n_merges} merges "
        f"on up to {sum(len(t.cases) for t in suite.tasks)} prompts each"
    )
    con.info("$ " + shlex.join(argv))
    table_path = out / "eval-table.txt"
    with table_path.open("w") as table:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loramerge_client", *argv[1:]],
            stdout=table,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
        )
        assert proc.stderr is not None
        for line in proc.stderr:
            con.info(line.rstrip())
        code = proc.wait()
    if code not in (0, 1):  # 1: some configuration failed; the report says which
        raise RuntimeError(f"loramerge eval exited with {code}")
    con.print()
    for line in table_path.read_text().splitlines():
        con.info(line)
    _tune(con, assets, services, plan, out)
    return sbs, shlex.join(argv)


def tune_argv(suite_path: Path, addr: str, plan: Plan, out: Path) -> list[str]:
    """``loramerge tune`` on the mergeable pair, for the same goal as the evaluation."""
    argv = [
        "loramerge", "tune", str(suite_path), "--adapters", ",".join(MERGEABLE_PAIR),
        "--goal", "min:" + ",".join(MERGEABLE_PAIR), "--trials", str(plan.tune_trials),
        "--seed", str(plan.seed), "--concurrency", "32", "--timeout", "600", "--inference-addr", addr,
        "--study", str(out / "tune" / "study.db"), "--recipe", str(out / "recipes.yaml"),
        "--recipe-name", "-".join(MERGEABLE_PAIR), "--out", str(out / "tune"),
        "--reuse", str(out / "report.json"),  # the grid's merges are not evaluated twice
    ]  # fmt: skip
    if plan.limit:
        argv += ["--limit", str(plan.limit)]
    return argv


def _tune(con: Console, assets: DemoAssets, services: DemoServices, plan: Plan, out: Path) -> None:
    con.step(f"Tune: an optuna TPE search over the mergeable pair, {plan.tune_trials} trials at most")
    if not plan.tune_trials:
        con.info("skipped")
        return
    (out / "tune").mkdir(parents=True, exist_ok=True)
    (out / "tune" / "study.db").unlink(missing_ok=True)  # a fresh study each run
    argv = tune_argv(assets.suite_path, services.inference.address, plan, out)
    con.info("$ " + shlex.join(argv))
    proc = subprocess.run(
        [sys.executable, "-m", "loramerge_client", *argv[1:]],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    for line in (proc.stderr + proc.stdout).splitlines():
        con.info(line)
    if proc.returncode != 0:
        raise RuntimeError(f"loramerge tune exited with {proc.returncode}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="full", help="asset variant [%(default)s]")
    ap.add_argument("--out", type=Path, help="report directory [out/demo]")
    ap.add_argument("--limit", type=int, help="prompts per task in the evaluation [all]")
    args = ap.parse_args(argv)
    plan = PLANS[args.variant]
    if args.limit is not None:
        plan = replace(plan, limit=args.limit)
    interrupt_on_sigterm()
    try:
        run_demo(args.variant, args.out, plan=plan)
    except KeyboardInterrupt:
        print("\ninterrupted; services stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
