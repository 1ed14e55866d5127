"""``loramerge tune`` without services: the search with an injected objective (a smooth function of
the configuration standing in for the live evaluation), determinism, resuming, early stop, the recipe
entry, the report files and the command line's bad input."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
import yaml

from loramerge.errors import InvalidArgument
from loramerge_client.cli import main as cli_main
from loramerge_client.eval import Row, parse_goal, parse_suite
from loramerge_client.tune import SearchSpace, load_scored, reusing, spec_dict, tune, write_recipe

SUITE = {
    "name": "toy",
    "tasks": [
        {"name": "facts", "adapter": "facts", "prompts": [{"prompt": "f", "expected": "x"}]},
        {"name": "upper", "adapter": "upper", "prompts": [{"prompt": "u", "expected": "X"}]},
    ],
}


def fake_scores(params: dict) -> dict[str, float]:
    """Peaks at facts 1.2 + upper 1, linear delta (like the demo); other strategies lose a share."""
    wf, wu = params["weights"]
    loss = {"linear": 0.0, "magnitude_prune": 0.05, "dare_linear": 0.1, "ties": 0.4, "dare_ties": 0.4}
    penalty = loss[params["strategy"]] + (0.6 if params["space"] == "factors" else 0.0)
    facts = max(0.0, 1.0 - abs(wf - 1.2) - penalty)
    upper = max(0.0, 1.0 - 0.8 * abs(wu - 1.0) - 0.3 * max(0.0, wf - 1.3) - penalty)
    return {"facts": round(facts, 4), "upper": round(upper, 4)}


class FakeObjective:
    def __init__(self, fail_factors: bool = False) -> None:
        self.batches: list[int] = []
        self.fail_factors = fail_factors

    async def __call__(self, configs):
        self.batches.append(len(configs))
        await asyncio.sleep(0)
        rows = []
        for c in configs:
            if self.fail_factors and c.params["space"] == "factors":
                rows.append(Row(c, error="INVALID_ARGUMENT: no"))
            else:
                rows.append(Row(c, scores=fake_scores(c.params)))
        return rows


def run_tune(tmp: Path | None = None, **kw):
    suite = parse_suite(SUITE)
    goal = parse_goal("min:facts,upper", suite)
    space = kw.pop("space", SearchSpace(adapters=("facts", "upper")))
    objective = kw.pop("objective", FakeObjective())
    kw.setdefault("target", 2.0)  # never reached: run the whole budget
    return asyncio.run(tune(suite, goal, space, objective, **kw)), objective


def history(result) -> list[tuple[str, float]]:
    return [(t.config.name, t.value) for t in result.trials]


def test_same_seed_same_study_and_another_seed_differs() -> None:
    a, obj = run_tune(trials=12, seed=7, parallel=3)
    b, _ = run_tune(trials=12, seed=7, parallel=3)
    c, _ = run_tune(trials=12, seed=8, parallel=3)
    assert history(a) == history(b)
    assert history(a) != history(c)
    assert obj.batches == [3, 2, 3, 1, 3]  # concurrently, in batches (the start design's parts apart)
    assert a.trials[0].config.name == "facts:1+upper:1 linear delta"  # the exact sum comes first
    assert a.stopped == "budget" and len(a.trials) == 12


def test_search_space_comes_from_the_proto_enums_and_allows_negative_weights() -> None:
    space = SearchSpace(adapters=("facts", "upper"))
    assert space.strategies == ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
    assert space.spaces == ("delta", "factors") and space.weight_range[0] < 0
    result, _ = run_tune(trials=20, seed=1)
    assert {t.config.params["strategy"] for t in result.trials} > {"linear"}
    densities = [t.config.params.get("density") for t in result.trials]
    for t, d in zip(result.trials, densities, strict=True):
        assert (d is not None) == (t.config.params["strategy"] != "linear")


def test_start_design_then_tpe() -> None:
    """The exact sum, each weight ± 0.2 alone, then TPE: here the probe facts 1.2 is the fake's peak
    (as the grid's facts 1.2 + upper 1 is the demo's)."""
    result, _ = run_tune(trials=20, seed=7)
    assert [t.config.name for t in result.trials[:9]] == [
        "facts:1+upper:1 linear delta",
        "facts:1.2+upper:1 linear delta",
        "facts:1+upper:1.2 linear delta",
        "facts:0.8+upper:1 linear delta",
        "facts:1+upper:0.8 linear delta",
        "facts:1.2+upper:1 ties d=0.8 delta",  # then the best weights with each other strategy
        "facts:1.2+upper:1 dare_linear d=0.8 delta",
        "facts:1.2+upper:1 dare_ties d=0.8 delta",
        "facts:1.2+upper:1 magnitude_prune d=0.8 delta",
    ]
    assert result.best is not None and result.best.value == 1.0
    plain, _ = run_tune(trials=20, seed=7, space=SearchSpace(adapters=("facts", "upper"), probe=0))
    assert plain.trials[1].config.name != "facts:1.2+upper:1 linear delta"


def test_patience_and_target_stop_early() -> None:
    result, _ = run_tune(trials=40, seed=3, patience=4, parallel=1)
    assert result.stopped == "patience" and len(result.trials) < 40
    after = [t.value for t in result.trials[-4:]]
    assert all(v <= result.best.value for v in after)
    result, _ = run_tune(trials=40, seed=3, target=0.5, parallel=1)
    assert result.stopped == "target" and result.best.value >= 0.5


def test_failed_trials_are_recorded_not_fatal() -> None:
    result, _ = run_tune(trials=10, seed=2, objective=FakeObjective(fail_factors=True))
    failed = [t for t in result.trials if t.config.params["space"] == "factors"]
    assert all(math.isnan(t.value) and t.error for t in failed)
    assert result.best is not None and result.best.config.params["space"] == "delta"


def test_resume_from_a_study_file(tmp_path: Path) -> None:
    db = str(tmp_path / "study.db")
    first, _ = run_tune(trials=6, seed=5, storage=db)
    resumed, obj = run_tune(trials=10, seed=5, storage=db)
    assert [t.number for t in resumed.trials] == list(range(10))
    assert history(resumed)[:6] == history(first) and sum(obj.batches) == 4
    journal = str(tmp_path / "study.journal")
    run_tune(trials=4, seed=5, storage=journal)
    again, obj = run_tune(trials=4, seed=5, storage=journal)
    assert len(again.trials) == 4 and obj.batches == []  # budget already spent


def test_recipe_entry_and_report_files(tmp_path: Path, chart_check) -> None:
    result, _ = run_tune(trials=8, seed=7)
    entry = result.recipe("facts-upper")
    spec = entry["facts-upper"]
    assert [a["id"] for a in spec["adapters"]] == ["facts", "upper"]
    assert spec["merge_strategy"] == result.best.config.params["strategy"].upper()
    path = write_recipe(tmp_path / "recipes.yaml", entry)
    write_recipe(path, {"other": spec_dict(result.trials[0].config)})
    data = yaml.safe_load(path.read_text())
    assert set(data) == {"facts-upper", "other"} and data["other"]["merge_strategy"] == "LINEAR"
    assert data["other"]["adapters"] == [{"id": "facts", "weight": 1.0}, {"id": "upper", "weight": 1.0}]
    assert json.loads(write_recipe(tmp_path / "r.json", entry).read_text()) == entry
    paths = result.write(tmp_path / "out")
    report = json.loads(paths["json"].read_text())
    assert report["best"]["number"] == result.best.number and len(report["trials"]) == 8
    assert any(t["pareto"] for t in report["trials"])
    assert "| trial | configuration | facts | upper |" in paths["markdown"].read_text()
    chart_check(paths["history"], 0)
    chart_check(paths["pareto"], 0)


def test_bad_search_space() -> None:
    with pytest.raises(InvalidArgument, match="--strategies must be among linear"):
        SearchSpace(adapters=("a", "b"), strategies=("slerp",))
    with pytest.raises(InvalidArgument, match="at least two adapters"):
        SearchSpace(adapters=("a",))


@pytest.mark.parametrize(
    ("suite", "extra", "words"),
    [
        (SUITE, ["--goal", "min:facts,nope"], "goal names tasks not in the suite: ['nope']"),
        ({"tasks": []}, [], "suite.tasks must be a non-empty list"),
        (SUITE, ["--trials", "0"], "--trials must be >= 1, got 0"),
        (SUITE, ["--strategies", "slerp"], "--strategies must be among"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tmp_path: Path, capsys, suite, extra, words) -> None:
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(suite))
    argv = ["tune", str(path), "--adapters", "facts,upper", *extra, "--inference-addr", "127.0.0.1:1"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err


def test_after_the_design_tpe_searches_a_trust_region_around_its_best() -> None:
    """Trials after the design stay within half the probe of the design's best weights, in its space,
    and no configuration is evaluated twice."""
    result, _ = run_tune(trials=20, seed=7)
    best = max(result.trials[:9], key=lambda t: t.value).config.params
    for t in result.trials[9:]:
        p = t.config.params
        assert p["space"] == best["space"]
        assert all(abs(w - c) <= 0.1 + 1e-9 for w, c in zip(p["weights"], best["weights"], strict=True)), p
    names = [t.config.name for t in result.trials]
    assert len(names) == len(set(names)) == 20
    assert [t.number for t in result.trials] == list(range(20))


def test_reuse_scores_of_an_eval_report(tmp_path: Path) -> None:
    suite = parse_suite(SUITE)
    first, _ = run_tune(trials=12, seed=7)
    rows = [
        {"kind": "merged", "params": t.config.params, "scores": t.scores, "error": None}
        for t in first.trials[:5]
    ]
    report = {"suite": "toy", "tasks": [{"name": "facts", "n": 1}, {"name": "upper", "n": 1}], "rows": rows}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    scored = load_scored(path, suite)
    hits: list[str] = []
    obj = FakeObjective()
    again, _ = run_tune(trials=12, seed=7, objective=reusing(obj, scored, hits))
    assert history(again) == history(first)
    assert len(hits) == 5 and sum(obj.batches) == 7
    path.write_text(json.dumps({**report, "tasks": [{"name": "facts", "n": 20}, {"name": "upper", "n": 1}]}))
    with pytest.raises(InvalidArgument, match="another suite or another --limit"):
        load_scored(path, suite)
