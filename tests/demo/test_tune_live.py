"""``loramerge tune`` on the small demo assets against the real services: within 20 trials it reaches
a min(facts, upper) at least as high as the demo grid's best, and the same seed repeats the study."""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml

from demo.__main__ import PLANS, SPACES, STRATEGIES
from demo.assets import MERGEABLE_PAIR, DemoAssets
from demo.services import running
from loramerge_client.aio import AsyncInferenceClient
from loramerge_client.cli import main as cli_main
from loramerge_client.eval import Report, evaluate, grid, load_suite, parse_goal

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(demo_small: DemoAssets, tmp_path_factory: pytest.TempPathFactory):
    with running(demo_small, tmp_path_factory.mktemp("tune-services")) as services:
        yield demo_small, services


@pytest.fixture(scope="module")
def tuned(stack, tmp_path_factory: pytest.TempPathFactory):
    """The demo's small grid and a 20-trial tune (seed 7), then a 6-trial tune with the same seed."""
    assets, services = stack
    tmp_path = tmp_path_factory.mktemp("tune-live")
    plan = PLANS["small"]
    addr = services.inference.address
    suite = load_suite(assets.suite_path, limit=plan.limit)
    goal = parse_goal("min:" + ",".join(MERGEABLE_PAIR), suite)
    configs = grid(
        list(MERGEABLE_PAIR), strategies=STRATEGIES, spaces=SPACES, weights=plan.weights,
        densities=plan.densities, seed=plan.seed,
    )  # fmt: skip

    async def run_grid():
        async with AsyncInferenceClient(addr, timeout=600) as client:
            return await evaluate(client, suite, configs, own_tasks_only=True, concurrency=16)

    rows = asyncio.run(run_grid())
    ranking = Report(suite, rows, goal).ranking
    grid_best = ranking[0][1]
    top = [(r.config.name, r.scores, v) for r, v in ranking[:3]]

    def argv(trials: int, name: str) -> list[str]:
        return [
            "tune", str(assets.suite_path), "--adapters", ",".join(MERGEABLE_PAIR),
            "--goal", "min:" + ",".join(MERGEABLE_PAIR), "--trials", str(trials), "--seed", "7",
            "--limit", str(plan.limit), "--concurrency", "16", "--inference-addr", addr, "--timeout", "600",
            "--study", str(tmp_path / f"{name}.db"), "--recipe", str(tmp_path / f"{name}.yaml"),
            "--out", str(tmp_path / name), "-q",
        ]  # fmt: skip

    def run_cli(trials: int, name: str) -> dict:
        assert cli_main(argv(trials, name)) == 0
        return json.loads((tmp_path / name / "tune.json").read_text())

    first = run_cli(20, "first")
    n = min(6, len(first["trials"]))
    again = run_cli(n, "again")
    return tmp_path, grid_best, top, len(configs), first, again


def test_tune_reaches_the_grids_best(tuned) -> None:
    _, grid_best, top, n_configs, first, _ = tuned
    trials = [(t["name"], t["scores"]) for t in first["trials"]]
    summary = f"grid ({n_configs} configurations) top {top}; tune best {first['best']}; trials {trials}"
    print(summary)
    assert first["best"]["goal_value"] >= grid_best, summary
    assert len(first["trials"]) <= 20


def test_same_seed_repeats_the_study_and_writes_the_outputs(tuned) -> None:
    tmp_path, _, _, _, first, again = tuned
    n = len(again["trials"])
    recipe = yaml.safe_load((tmp_path / "first.yaml").read_text())
    assert [a["id"] for a in recipe["tuned-facts-upper"]["adapters"]] == list(MERGEABLE_PAIR)
    for name in ("tune.json", "tune.md", "history.png", "pareto.png"):
        assert (tmp_path / "first" / name).is_file()
    key = [(t["name"], t["scores"], t["goal_value"]) for t in first["trials"][:n]]
    assert [(t["name"], t["scores"], t["goal_value"]) for t in again["trials"]] == key
