"""Evaluate merge configurations: a suite of prompts with expected outputs, scored per task, for the
base model, every single adapter and every merged configuration, against a running inference service.

    suite = load_suite("suite.json")
    configs = baseline_configs(suite) + grid(["facts", "upper"], strategies=["linear", "ties"],
                                             spaces=["delta"], weights=[(1, 1)], densities=[0.5])
    async with AsyncInferenceClient(addr) as client:
        rows = await evaluate(client, suite, configs)
    report = Report(suite, rows, parse_goal("min:facts,upper", suite))
    report.write("out/")            # report.json, report.md, chart.png

Suite file (JSON)::

    {"name": "...", "sampling": {"max_tokens": 12, "stop": []},
     "tasks": [{"name": "facts", "adapter": "facts", "scorer": "exact", "skill": "...",
                "prompts": [{"prompt": "fact: abc =", "expected": "xyz"}, ...]}, ...]}

Scorers: ``exact`` (after trimming surrounding white space), ``casefold`` (case-insensitive),
``similarity`` (difflib's ratio, 0..1), ``contains`` (the expected text occurs in the output).
A task's score is the mean over its prompts.
"""

from __future__ import annotations

import asyncio
import difflib
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramerge.errors import InvalidArgument, LoramergeError
from loramerge.strategy_params import DENSITY_STRATEGIES
from loramerge_client.types import Adapter, AdapterChoice, MergedAdapters, SamplingParams

# ---------------------------------------------------------------- scorers


def score_exact(output: str, expected: str) -> float:
    return float(output.strip() == expected.strip())


def score_casefold(output: str, expected: str) -> float:
    return float(output.strip().casefold() == expected.strip().casefold())


def score_similarity(output: str, expected: str) -> float:
    """difflib's ratio 2·M / (len(a) + len(b)), M the matched characters: 1.0 for equal strings."""
    return difflib.SequenceMatcher(None, output.strip(), expected.strip(), autojunk=False).ratio()


def score_contains(output: str, expected: str) -> float:
    return float(expected.strip() in output)


SCORERS: dict[str, Callable[[str, str], float]] = {
    "exact": score_exact,
    "casefold": score_casefold,
    "similarity": score_similarity,
    "contains": score_contains,
}
SCORER_ALIASES = {"exact_match": "exact", "case_insensitive": "casefold", "ratio": "similarity"}

# ---------------------------------------------------------------- suite


@dataclass(frozen=True)
class Case:
    prompt: str
    expected: str


@dataclass(frozen=True)
class Task:
    name: str
    cases: tuple[Case, ...]
    scorer: str = "exact"
    adapter: str | None = None  # the adapter meant to have this skill, if any
    skill: str = ""

    def score(self, output: str, case: Case) -> float:
        return SCORERS[self.scorer](output, case.expected)


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: tuple[Task, ...]
    sampling: SamplingParams

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def adapters(self) -> list[str]:
        """Adapters named by the tasks, in order of first mention."""
        return list(dict.fromkeys(t.adapter for t in self.tasks if t.adapter))


def load_suite(path: str | Path, *, limit: int = 0) -> Suite:
    """Read and check a suite file; ``limit`` > 0 keeps the first ``limit`` prompts of each task."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise InvalidArgument(f"suite {path} is not JSON: {err}", field="suite") from None
    return parse_suite(data, limit=limit)


def parse_suite(data: Any, *, limit: int = 0) -> Suite:
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list) or not data["tasks"]:
        raise InvalidArgument("suite.tasks must be a non-empty list", field="suite.tasks")
    tasks: list[Task] = []
    for i, t in enumerate(data["tasks"]):
        where = f"suite.tasks[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise InvalidArgument(f"{where}.name must be a non-empty string, got {t!r:.80}", field=where)
        scorer = str(t.get("scorer", "exact")).lower()
        scorer = SCORER_ALIASES.get(scorer, scorer)
        if scorer not in SCORERS:
            raise InvalidArgument(
                f"{where}.scorer must be one of {', '.join(SCORERS)}, got {t.get('scorer')!r}",
                field=f"{where}.scorer",
            )
        prompts = t.get("prompts")
        if not isinstance(prompts, list) or not prompts:
            raise InvalidArgument(f"{where}.prompts must be a non-empty list", field=f"{where}.prompts")
        cases = []
        for j, c in enumerate(prompts):
            if not isinstance(c, dict) or not isinstance(c.get("prompt"), str) or "expected" not in c:
                raise InvalidArgument(
                    f"{where}.prompts[{j}] must be an object with 'prompt' and 'expected', got {c!r:.80}",
                    field=f"{where}.prompts[{j}]",
                )
            cases.append(Case(c["prompt"], str(c["expected"])))
        if limit > 0:
            cases = cases[:limit]
        tasks.append(Task(t["name"], tuple(cases), scorer, t.get("adapter") or None, t.get("skill", "")))
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"suite.tasks names must be unique, got {names}", field="suite.tasks")
    s = data.get("sampling") or {}
    sampling = SamplingParams(
        max_tokens=int(s.get("max_tokens", 32)),
        temperature=float(s.get("temperature", 0.0)),
        stop=tuple(s.get("stop", ())),
    )
    return Suite(str(data.get("name", "suite")), tuple(tasks), sampling)


# ---------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Config:
    """One model to evaluate: the base, one adapter, or a merged set."""

    name: str
    kind: str  # "base" | "single" | "merged"
    choice: AdapterChoice = None
    params: dict[str, Any] = field(default_factory=dict, compare=False)


def baseline_configs(suite: Suite) -> list[Config]:
    """The base model and each adapter the suite names, alone at weight 1."""
    return single_configs(suite.adapters())


def single_configs(adapters: Sequence[str], *, base: bool = True) -> list[Config]:
    out = [Config("base", "base")] if base else []
    return out + [Config(a, "single", Adapter(a), {"adapters": [a]}) for a in adapters]


def merged_config(
    adapters: Sequence[str],
    weights: Sequence[float],
    strategy: str = "linear",
    space: str = "delta",
    density: float | None = None,
    seed: int | None = None,
    name: str = "",
    target_rank: int = 0,
) -> Config:
    if len(weights) != len(adapters):
        raise InvalidArgument(
            f"weights must hold one weight per adapter ({len(adapters)}), got {list(weights)}",
            field="weights",
        )
    spec = MergedAdapters(
        ids=list(adapters),
        weights=[float(w) for w in weights],
        merge_strategy=strategy,
        density=density if strategy in DENSITY_STRATEGIES else None,
        space=space,
        seed=seed,
        target_rank=int(target_rank),
    )
    params: dict[str, Any] = {
        "adapters": list(adapters),
        "weights": [float(w) for w in weights],
        "strategy": strategy,
        "space": space,
    }
    if spec.density is not None:
        params["density"] = spec.density
    if seed is not None:
        params["seed"] = seed
    if target_rank:
        params["target_rank"] = int(target_rank)
    return Config(name or config_name(params), "merged", spec, params)


def config_name(params: dict[str, Any]) -> str:
    """``facts:1+upper:1 ties d=0.5 delta`` (`` r=64`` when a target rank is asked for)."""
    mix = "+".join(f"{a}:{w:g}" for a, w in zip(params["adapters"], params["weights"], strict=True))
    density = f" d={params['density']:g}" if "density" in params else ""
    rank = f" r={params['target_rank']}" if params.get("target_rank") else ""
    return f"{mix} {params['strategy']}{density} {params['space']}{rank}"


def grid(
    adapters: Sequence[str],
    *,
    strategies: Iterable[str] = ("linear",),
    spaces: Iterable[str] = ("delta",),
    weights: Iterable[Sequence[float]] = (),
    densities: Iterable[float] = (0.5,),
    seed: int | None = None,
    target_ranks: Iterable[int] = (0,),
) -> list[Config]:
    """Every combination of strategy × space × weights × density × target rank (density only where
    the strategy uses it), in that order, without duplicates. Weights default to 1 for every adapter;
    target rank 0 is the merge service's default (exact for linear, the sum of the ranks otherwise)."""
    if len(adapters) < 2:
        raise InvalidArgument(f"a grid needs at least two adapters, got {list(adapters)}", field="adapters")
    weight_sets = [tuple(w) for w in weights] or [tuple(1.0 for _ in adapters)]
    density_list = list(densities) or [0.5]
    for d in density_list:
        if not 0 < d <= 1:
            raise InvalidArgument(f"densities must be in (0, 1], got {d}", field="densities")
    ranks = list(target_ranks) or [0]
    if any(r < 0 for r in ranks):
        raise InvalidArgument(f"target ranks must be >= 0, got {ranks}", field="target_ranks")
    out: dict[str, Config] = {}
    for strategy, space, w in itertools.product(strategies, spaces, weight_sets):
        strategy = strategy.lower().replace("-", "_")
        for d, r in itertools.product(density_list if strategy in DENSITY_STRATEGIES else [None], ranks):
            c = merged_config(adapters, w, strategy, space.lower(), d, seed, target_rank=r)
            out.setdefault(c.name, c)
    return list(out.values())


def load_configs(path: str | Path) -> list[Config]:
    """A JSON list of merged configurations: ``{"name"?, "adapters": [...], "weights"?, "strategy"?,
    "space"?, "density"?, "seed"?, "target_rank"?}``."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise InvalidArgument(f"configs {path} is not JSON: {err}", field="configs") from None
    if not isinstance(data, list):
        raise InvalidArgument("configs must be a JSON list of objects", field="configs")
    out = []
    for i, c in enumerate(data):
        if not isinstance(c, dict) or not c.get("adapters"):
            raise InvalidArgument(f"configs[{i}].adapters must be a non-empty list", field=f"configs[{i}]")
        adapters = [str(a) for a in c["adapters"]]
        out.append(
            merged_config(
                adapters,
                c.get("weights") or [1.0] * len(adapters),
                str(c.get("strategy", "linear")),
                str(c.get("space", "delta")),
                c.get("density"),
                c.get("seed"),
                str(c.get("name", "")),
                int(c.get("target_rank", 0)),
            )
        )
    return out


# ---------------------------------------------------------------- running


@dataclass
class Row:
    """What one configuration did: a score per task, its outputs, and how its adapter was obtained."""

    config: Config
    scores: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, list[str]] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0

    def mean(self, tasks: Sequence[str]) -> float:
        vals = [self.scores[t] for t in tasks if t in self.scores]
        return sum(vals) / len(vals) if vals else math.nan


ProgressFn = Callable[[int, int, Row], None]


async def evaluate(
    client: Any,
    suite: Suite,
    configs: Sequence[Config],
    *,
    concurrency: int = 8,
    parallel_configs: int = 2,
    on_config_done: ProgressFn | None = None,
    timeout: float | None = None,
    own_tasks_only: bool = False,
) -> list[Row]:
    """Run every prompt of every task through every configuration; rows in ``configs`` order.

    ``client`` is an ``AsyncInferenceClient`` (anything with its ``generate`` coroutine). Requests run
    ``concurrency`` at a time; at most ``parallel_configs`` configurations are in flight, so the
    service holds few distinct adapters at once. Each configuration's first request goes alone (it
    may trigger the merge and the load); a configuration that fails is reported, not fatal.
    With ``own_tasks_only`` a merged configuration runs only the tasks of its own adapters (and tasks
    that name no adapter); its other cells stay empty.
    """
    requests = asyncio.Semaphore(max(1, concurrency))
    slots = asyncio.Semaphore(max(1, parallel_configs))
    rows = [Row(c) for c in configs]
    done = 0

    async def one(choice: AdapterChoice, prompt: str) -> tuple[str, Any]:
        async with requests:
            resp = await client.generate(prompt, choice, suite.sampling, timeout=timeout)
        return resp.text, resp.adapter

    async def run_config(row: Row) -> None:
        nonlocal done
        async with slots:
            t0 = time.monotonic()
            tasks = [t for t in suite.tasks if _runs(row.config, t, own_tasks_only)]
            cases = [(task, case) for task in tasks for case in task.cases]
            try:
                first_text, usage = await one(row.config.choice, cases[0][1].prompt)
                rest = await asyncio.gather(*(one(row.config.choice, c.prompt) for _, c in cases[1:]))
            except LoramergeError as err:
                row.error = f"{err.code.name}: {err.message}"
            else:
                texts = [first_text] + [t for t, _ in rest]
                for (task, case), text in zip(cases, texts, strict=True):
                    row.outputs.setdefault(task.name, []).append(text)
                    row.scores[task.name] = row.scores.get(task.name, 0.0) + task.score(text, case)
                for task in tasks:
                    row.scores[task.name] = round(row.scores[task.name] / len(task.cases), 4)
                row.usage = _usage(usage)
            row.seconds = round(time.monotonic() - t0, 3)
        done += 1
        if on_config_done:
            on_config_done(done, len(rows), row)

    await asyncio.gather(*(run_config(r) for r in rows))
    return rows


def _runs(config: Config, task: Task, own_tasks_only: bool) -> bool:
    if not own_tasks_only or config.kind != "merged" or task.adapter is None:
        return True
    return task.adapter in config.params.get("adapters", ())


def _usage(adapter: Any) -> dict[str, Any]:
    if adapter is None or not getattr(adapter, "name", ""):
        return {}
    return {
        "name": adapter.name,
        "merge_key": adapter.merge_key,
        "rank": adapter.rank,
        "merge_ms": round(adapter.merge_ms, 2),
        "load_ms": round(adapter.load_ms, 2),
    }


# ---------------------------------------------------------------- goal and ranking


@dataclass(frozen=True)
class Goal:
    """What "best" means: the highest ``min`` or ``mean`` score over ``tasks``."""

    kind: str
    tasks: tuple[str, ...]

    def value(self, row: Row) -> float:
        vals = [row.scores.get(t, math.nan) for t in self.tasks]
        if row.error or any(math.isnan(v) for v in vals):
            return math.nan
        return min(vals) if self.kind == "min" else sum(vals) / len(vals)

    def describe(self) -> str:
        return f"highest {self.kind} score over {', '.join(self.tasks)}"


def parse_goal(text: str, suite: Suite, configs: Sequence[Config] = ()) -> Goal:
    """``min``, ``mean``, ``min:a,b``, ``mean:a,b`` or ``task:a`` (= ``min:a``). Without tasks: the tasks
    whose adapters take part in the merged configurations (all tasks when none do)."""
    kind, _, names = text.partition(":")
    kind = kind.strip().lower()
    if kind == "task":
        kind = "min"
    if kind not in ("min", "mean"):
        raise InvalidArgument(f"goal must be min, mean or task (with :TASKS), got {text!r}", field="goal")
    tasks = [n.strip() for n in names.split(",") if n.strip()]
    if not tasks:
        merged = {a for c in configs if c.kind == "merged" for a in c.params.get("adapters", ())}
        tasks = [t.name for t in suite.tasks if t.adapter in merged] or suite.task_names
    unknown = [t for t in tasks if t not in suite.task_names]
    if unknown:
        raise InvalidArgument(
            f"goal names tasks not in the suite: {unknown} (tasks: {suite.task_names})", field="goal"
        )
    return Goal(kind, tuple(tasks))


def rank(rows: Sequence[Row], goal: Goal) -> list[tuple[Row, float]]:
    """Merged configurations that ran, best first: by the goal, then the mean over every task."""
    scored = [(r, goal.value(r)) for r in rows if r.config.kind == "merged" and not math.isnan(goal.value(r))]
    all_tasks = list(rows[0].scores) if rows else []
    return sorted(scored, key=lambda rv: (-rv[1], -rv[0].mean(all_tasks)))


def single_scores(rows: Sequence[Row], suite: Suite) -> dict[str, float]:
    """Each adapter-owned task's score under its own adapter alone (the single configuration)."""
    out: dict[str, float] = {}
    singles = [r for r in rows if r.config.kind == "single" and not r.error]
    for task in suite.tasks:
        own = [r for r in singles if r.config.params.get("adapters") == [task.adapter]]
        own = [r for r in own if task.name in r.scores]
        if task.adapter and own:
            out[task.name] = own[0].scores[task.name]
    return out


def retention(scores: dict[str, float], own: dict[str, float]) -> dict[str, float]:
    """retention_t = merged score_t ÷ score_t of t's adapter alone, for tasks with a positive own score."""
    return {t: round(scores[t] / own[t], 4) for t in scores if own.get(t, 0.0) > 0}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (maximising both coordinates): p is dominated
    when some q has q_x ≥ p_x and q_y ≥ p_y with at least one strict. NaN points are never on it."""
    ok = [i for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))]
    front = []
    for i in ok:
        xi, yi = points[i]
        if not any(
            points[j][0] >= xi and points[j][1] >= yi and (points[j][0] > xi or points[j][1] > yi) for j in ok
        ):
            front.append(i)
    return front


# ---------------------------------------------------------------- report


@dataclass
class Report:
    suite: Suite
    rows: list[Row]
    goal: Goal
    ranking: list[tuple[Row, float]] = field(init=False)
    own: dict[str, float] = field(init=False)  # each adapter-owned task's single-adapter score

    def __post_init__(self) -> None:
        self.ranking = rank(self.rows, self.goal)
        self.own = single_scores(self.rows, self.suite)

    def retention(self, row: Row) -> dict[str, float]:
        """Merged rows only: score ÷ the adapter's own single score, per task (see ``retention``)."""
        return retention(row.scores, self.own) if row.config.kind == "merged" and not row.error else {}

    @property
    def retention_tasks(self) -> list[str]:
        """Tasks with a retention column: those whose adapter alone scored above 0."""
        return [t for t in self.suite.task_names if self.own.get(t, 0.0) > 0]

    def pareto_tasks(self, tasks: Sequence[str] | None = None) -> tuple[str, str] | None:
        """The two tasks of the Pareto plot: ``tasks`` if given, else the goal's first two (or none)."""
        chosen = list(tasks) if tasks else list(self.goal.tasks[:2])
        if len(chosen) != 2:
            return None
        unknown = [t for t in chosen if t not in self.suite.task_names]
        if unknown:
            raise InvalidArgument(
                f"pareto tasks not in the suite: {unknown} (tasks: {self.suite.task_names})", field="pareto"
            )
        return chosen[0], chosen[1]

    @property
    def best(self) -> Row | None:
        return self.ranking[0][0] if self.ranking else None

    def recommendation(self) -> str:
        if self.best is None:
            return "No merged configuration ran successfully; nothing to recommend."
        best, value = self.ranking[0]
        return f"Use: {best.config.name}  ({self.goal.describe()} = {value:.2f})"

    def to_dict(self) -> dict[str, Any]:
        tasks = self.suite.task_names
        return {
            "suite": self.suite.name,
            "tasks": [
                {
                    "name": t.name,
                    "adapter": t.adapter,
                    "scorer": t.scorer,
                    "skill": t.skill,
                    "n": len(t.cases),
                }
                for t in self.suite.tasks
            ],
            "goal": {
                "kind": self.goal.kind,
                "tasks": list(self.goal.tasks),
                "description": self.goal.describe(),
            },
            "rows": [
                {
                    "name": r.config.name,
                    "kind": r.config.kind,
                    "params": r.config.params,
                    "scores": r.scores,
                    "mean": None if r.error else round(r.mean(tasks), 4),
                    "goal_value": None if math.isnan(self.goal.value(r)) else round(self.goal.value(r), 4),
                    "retention": self.retention(r),
                    "error": r.error or None,
                    "adapter": r.usage,
                    "seconds": r.seconds,
                    "outputs": r.outputs,
                }
                for r in self.rows
            ],
            "ranking": [{"name": r.config.name, "goal_value": round(v, 4)} for r, v in self.ranking],
            "recommendation": None
            if self.best is None
            else {
                "name": self.best.config.name,
                "params": self.best.config.params,
                "goal_value": self.ranking[0][1],
            },
        }

    def _cells(self, r: Row) -> list[str]:
        kept_tasks = self.retention_tasks
        if r.error:
            return ["error"] * len(self.suite.tasks) + [""] * (1 + len(kept_tasks)) + [r.error]
        goal = self.goal.value(r)
        cells = [f"{r.scores[t]:.2f}" if t in r.scores else "-" for t in self.suite.task_names]
        kept = self.retention(r)
        kept_cells = [f"{kept[t]:.0%}" if t in kept else "" for t in kept_tasks]
        note = f"rank {r.usage['rank']}" if r.usage.get("rank") else ""
        goal_cell = "" if r.config.kind != "merged" or math.isnan(goal) else f"{goal:.2f}"
        return [*cells, goal_cell, *kept_cells, note]

    def to_markdown(self) -> str:
        kept = [f"{t} kept" for t in self.retention_tasks]
        head = ["configuration", *self.suite.task_names, f"goal ({self.goal.kind})", *kept, "note"]
        lines = [
            f"### {self.suite.name}: per-task scores",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join(["---", *(["---:"] * (len(head) - 2)), "---"]) + "|",
        ]
        best = self.best
        for r in self.rows:
            name = f"**{r.config.name}**" if r is best else r.config.name
            lines.append("| " + " | ".join([name, *self._cells(r)]) + " |")
        lines += [
            "",
            f"Goal: {self.goal.describe()}. {self.recommendation()}",
            "",
            "\"kept\" is retention: the merged score ÷ the task's adapter's own score alone.",
            "",
        ]
        return "\n".join(lines)

    def to_terminal(self) -> str:
        kept = [f"{t}:kept" for t in self.retention_tasks]
        head = ["configuration", *self.suite.task_names, f"goal:{self.goal.kind}", *kept, ""]
        body = [[("* " if r is self.best else "  ") + r.config.name, *self._cells(r)] for r in self.rows]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

        def fmt(row: list[str]) -> str:
            cells = [row[0].ljust(widths[0])] + [
                c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1], strict=True)
            ]
            return "  ".join([*cells, row[-1]]).rstrip()

        lines = [fmt(head), "  ".join("-" * w for w in widths[:-1]), *map(fmt, body)]
        return "\n".join([*lines, "", f"goal: {self.goal.describe()}", self.recommendation()])

    def write(
        self, out_dir: str | Path, *, chart: bool = True, pareto: Sequence[str] | None = None
    ) -> dict[str, Path]:
        """report.json, report.md and, with ``chart``, the heat map chart.png and (when two tasks are
        chosen or the goal has two) the Pareto scatter pareto.png."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        pair = self.pareto_tasks(pareto)
        paths = {"json": out / "report.json", "markdown": out / "report.md"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        paths["markdown"].write_text(self.to_markdown())
        if chart:
            paths["chart"] = out / "chart.png"
            plot(self, paths["chart"])
            if pair:
                paths["pareto"] = out / "pareto.png"
                plot_pareto(self, paths["pareto"], pair)
        return paths


def plot(report: Report, path: str | Path) -> None:
    """A heat map of configurations × tasks (score in each cell), the recommended row marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report.suite.task_names
    rows = report.rows
    grid_vals = [[math.nan if r.error else r.scores.get(t, math.nan) for t in tasks] for r in rows]
    height = 1.2 + 0.32 * len(rows)
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * len(tasks) + 2.8, height), dpi=110)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")  # grey: not run, or failed
    im = ax.imshow(grid_vals, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.xaxis.tick_top()
    labels = [("▶ " if r is report.best else "") + r.config.name for r in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    for i, vals in enumerate(grid_vals):
        for j, v in enumerate(vals):
            if rows[i].error:
                text = "err"
            elif math.isnan(v):
                text = "-"
            else:
                text = f"{v:.2f}"
            dark = not math.isnan(v) and v < 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="score")
    ax.set_title(f"{report.suite.name}: {report.goal.describe()}", fontsize=9, pad=28)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_pareto(report: Report, path: str | Path, tasks: tuple[str, str]) -> None:
    """A scatter of the configurations' scores on two tasks (each configuration a point), the Pareto
    front of the merged ones highlighted and joined, the base and single adapters as references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tx, ty = tasks
    rows = [r for r in report.rows if not r.error and tx in r.scores and ty in r.scores]
    merged = [r for r in rows if r.config.kind == "merged"]
    points = [(r.scores[tx], r.scores[ty]) for r in merged]
    front = set(pareto_front(points))
    fig, ax = plt.subplots(figsize=(6.4, 5.4), dpi=110)
    others = [p for i, p in enumerate(points) if i not in front]
    if others:
        ax.scatter(*zip(*others, strict=True), s=36, c="#8fa8c8", alpha=0.7, label="merged configuration")
    on = sorted((points[i], merged[i]) for i in front)
    if on:
        xs, ys = zip(*(p for p, _ in on), strict=True)
        ax.plot(xs, ys, "-", color="#d62728", lw=1.2, zorder=2)
        ax.scatter(xs, ys, s=70, c="#d62728", edgecolors="black", zorder=3, label="Pareto front")
        for (x, y), r in on:
            ax.annotate(r.config.name, (x, y), fontsize=6, xytext=(4, 4), textcoords="offset points")
    for r in rows:
        if r.config.kind != "merged":
            ax.scatter(r.scores[tx], r.scores[ty], marker="s", s=40, c="#444444", zorder=2)
            ax.annotate(r.config.name, (r.scores[tx], r.scores[ty]), fontsize=7, xytext=(4, -10),
                        textcoords="offset points", color="#444444")  # fmt: skip
    best = report.best
    if best is not None and tx in best.scores and ty in best.scores:
        ax.scatter(best.scores[tx], best.scores[ty], marker="*", s=260, c="gold", edgecolors="black",
                   zorder=4, label=f"recommended: {best.config.name}")  # fmt: skip
    ax.set_xlim(-0.05, 1.08)
    ax.set_ylim(-0.05, 1.08)
    ax.set_xlabel(f"{tx} score")
    ax.set_ylabel(f"{ty} score")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"{report.suite.name}: {tx} vs {ty} ({len(merged)} merged configurations)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
