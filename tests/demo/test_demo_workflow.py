"""The demo workflow on the small assets against the real services (merge service + vLLM inference
service on loopback): the evaluation's substance, the report files, and nothing left running."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from demo.__main__ import PLANS, Console, run_demo
from demo.assets import CONFLICTING_PAIR, MERGEABLE_PAIR, DemoAssets

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo_run(demo_small: DemoAssets, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("demo")
    stream = io.StringIO()
    result = run_demo("small", out, plan=PLANS["small"], console=Console(7, stream))
    return result, stream.getvalue()


def test_single_adapters_have_their_own_skill_only(demo_run) -> None:
    result, _ = demo_run
    data = json.loads(result.paths["json"].read_text())
    tasks = [t["name"] for t in data["tasks"]]
    rows = {r["name"]: r for r in data["rows"]}
    assert all(rows["base"]["scores"][t] <= 0.2 for t in tasks), rows["base"]
    for task in data["tasks"]:
        scores = rows[task["adapter"]]["scores"]
        assert scores[task["name"]] >= 0.9, (task["adapter"], scores)
        assert all(scores[t] <= 0.2 for t in tasks if t != task["name"]), (task["adapter"], scores)


def test_mergeable_pair_keeps_both_skills_and_exact_beats_factors(demo_run) -> None:
    result, _ = demo_run
    data = json.loads(result.paths["json"].read_text())
    a, b = MERGEABLE_PAIR
    best = data["recommendation"]
    assert best["params"]["adapters"] == [a, b]
    rows = {r["name"]: r for r in data["rows"]}
    assert rows[best["name"]]["scores"][a] >= 0.5 and rows[best["name"]]["scores"][b] >= 0.5, best

    delta = rows[f"{a}:1+{b}:1 linear delta"]["scores"]
    factors = rows[f"{a}:1+{b}:1 linear factors"]["scores"]
    assert min(delta.values()) >= min(factors.values()), (delta, factors)
    assert sum(delta.values()) >= sum(factors.values()), (delta, factors)
    # every strategy of the grid ran in both spaces, each with its own merged adapter
    merged = [r for r in data["rows"] if r["kind"] == "merged" and r["params"]["adapters"] == [a, b]]
    assert {(r["params"]["strategy"], r["params"]["space"]) for r in merged} >= {
        (s, sp)
        for s in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
        for sp in ("delta", "factors")
    }
    assert not any(r["error"] for r in data["rows"]), [r for r in data["rows"] if r["error"]]
    assert len({r["adapter"]["merge_key"] for r in merged}) == len(merged)


def test_conflicting_pair_is_reported_as_conflicting(demo_run) -> None:
    result, output = demo_run
    c = result.summary["pairs"]["conflicting"]
    assert c["adapters"] == list(CONFLICTING_PAIR)
    assert c["best_min"] < 0.5
    assert "they conflict" in output


def test_report_files_and_chart(demo_run, chart_check) -> None:
    result, output = demo_run
    for key in ("json", "markdown", "chart", "demo", "summary"):
        assert result.paths[key].is_file(), key
    md = result.paths["demo"].read_text()
    assert "## Inventory" in md and "## Same prompts, side by side" in md and "| configuration |" in md
    rows = len(json.loads(result.paths["json"].read_text())["rows"])
    chart_check(result.paths["chart"], rows)
    assert f"Report: {result.paths['demo']}" in output and f"Chart:  {result.paths['chart']}" in output
    for step in ("[1/7]", "[2/7]", "[3/7]", "[4/7]", "[5/7]", "[6/7]", "[7/7]"):
        assert step in output


def test_tune_reaches_the_grids_best(demo_run) -> None:
    result, _ = demo_run
    grid_best = json.loads(result.paths["json"].read_text())["recommendation"]["goal_value"]
    tuned = json.loads((result.out_dir / "tune" / "tune.json").read_text())
    assert len(tuned["trials"]) <= 20 and tuned["best"]["goal_value"] >= grid_best, (tuned["best"], grid_best)
    assert "facts-upper" in (result.out_dir / "recipes.yaml").read_text()


def test_nothing_left_running(demo_run) -> None:
    result, _ = demo_run
    assert len(result.service_pids) == 2
    for pid in result.service_pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # the service and everything it spawned (vLLM workers) are gone
    assert not list(Path("/dev/shm").glob(f"loramerge-demo-{os.getpid()}*"))
