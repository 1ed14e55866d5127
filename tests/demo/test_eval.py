"""``loramerge eval`` pieces without services: suite checks, scorers, the grid, ranking, report files.
The model is a small fake that answers from a table, so every score below is known in advance."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from loramerge.errors import InvalidArgument
from loramerge_client.cli import main as cli_main
from loramerge_client.eval import (
    Report,
    baseline_configs,
    evaluate,
    grid,
    load_configs,
    parse_goal,
    parse_suite,
    score_similarity,
)
from loramerge_client.types import Adapter, MergedAdapters

SUITE = {
    "name": "toy",
    "sampling": {"max_tokens": 8},
    "tasks": [
        {"name": "up", "adapter": "u", "scorer": "exact", "prompts": [{"prompt": "up a", "expected": "A"}]},
        {
            "name": "hi",
            "adapter": "h",
            "scorer": "casefold",
            "prompts": [{"prompt": "hi 1", "expected": "Hello"}, {"prompt": "hi 2", "expected": "World"}],
        },
    ],
}


class FakeClient:
    """Answers like a model whose skills depend on the adapter choice; counts requests."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    async def generate(self, prompt, adapter, sampling, *, timeout=None):
        self.calls.append((prompt, adapter))
        await asyncio.sleep(0)
        skills: set[str] = set()
        if isinstance(adapter, Adapter):
            skills = {adapter.id}
        elif isinstance(adapter, MergedAdapters):
            if adapter.merge_strategy == "ties":
                skills = set(adapter.ids)
            elif list(adapter.weights) == [1.0, 1.0]:
                skills = {"u"}
        if adapter is not None and getattr(adapter, "space", "") == "factors":
            raise InvalidArgument("merged_adapters.space factors refused by the fake", field="space")
        text = {"up a": "A" if "u" in skills else "a", "hi 1": "hello" if "h" in skills else "hm"}.get(
            prompt, "WORLD" if "h" in skills else "?"
        )
        return SimpleNamespace(text=text, adapter=SimpleNamespace(name="", merge_key=""))


def test_suite_errors_name_the_field_and_value() -> None:
    bad = json.loads(json.dumps(SUITE))
    bad["tasks"][1]["scorer"] = "fuzzy"
    with pytest.raises(InvalidArgument, match=r"suite.tasks\[1\].scorer must be one of .*got 'fuzzy'"):
        parse_suite(bad)
    with pytest.raises(InvalidArgument, match=r"suite\.tasks must be a non-empty list"):
        parse_suite({"tasks": []})
    bad["tasks"][1] = {"name": "hi", "prompts": [{"prompt": "x"}]}
    with pytest.raises(InvalidArgument, match=r"suite.tasks\[1\].prompts\[0\]"):
        parse_suite(bad)


def test_scorers() -> None:
    assert score_similarity("abcd", "abcd") == 1.0
    assert score_similarity("abcd", "abce") == pytest.approx(0.75)
    assert score_similarity("", "xyz") == 0.0


def test_grid_is_the_product_with_density_only_where_used() -> None:
    configs = grid(
        ["a", "b"],
        strategies=["linear", "ties", "dare-ties"],
        spaces=["delta", "factors"],
        weights=[(1, 1), (0.5, 1)],
        densities=[0.5, 0.8],
        seed=3,
    )
    # linear: 2 spaces x 2 weights; ties and dare_ties: 2 x 2 x 2 densities each
    assert len(configs) == 4 + 8 + 8
    assert len({c.name for c in configs}) == len(configs)
    ties = [c for c in configs if c.params["strategy"] == "ties"]
    assert {c.choice.density for c in ties} == {0.5, 0.8}
    assert all(c.choice.density is None for c in configs if c.params["strategy"] == "linear")
    spec = configs[0].choice.to_proto()  # a real MergeSpec
    assert (list(spec.ids), list(spec.weights)) == (["a", "b"], [1.0, 1.0])
    ranked = grid(["a", "b"], strategies=["ties"], densities=[0.5], target_ranks=[0, 32])
    assert [c.name for c in ranked] == ["a:1+b:1 ties d=0.5 delta", "a:1+b:1 ties d=0.5 delta r=32"]
    assert [c.choice.to_proto().target_rank for c in ranked] == [0, 32]
    with pytest.raises(InvalidArgument, match=r"densities must be in \(0, 1\], got 1.5"):
        grid(["a", "b"], strategies=["ties"], densities=[1.5])
    with pytest.raises(InvalidArgument, match="one weight per adapter"):
        grid(["a", "b"], weights=[(1, 1, 1)])


def test_configs_file(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"adapters": ["a", "b"], "strategy": "ties", "density": 0.3, "name": "t"}]))
    (c,) = load_configs(path)
    assert (c.name, c.choice.density, list(c.choice.weights)) == ("t", 0.3, [1.0, 1.0])


def test_evaluate_ranks_and_writes_reports(tmp_path: Path, chart_check) -> None:
    suite = parse_suite(SUITE)
    merges = grid(["u", "h"], strategies=["linear", "ties"], spaces=["delta", "factors"], weights=[(1, 1)])
    configs = baseline_configs(suite) + merges
    client = FakeClient()
    rows = asyncio.run(evaluate(client, suite, configs, concurrency=3))
    by = {r.config.name: r for r in rows}
    assert by["base"].scores == {"up": 0.0, "hi": 0.0}
    assert by["u"].scores == {"up": 1.0, "hi": 0.0}
    assert by["h"].scores == {"up": 0.0, "hi": 1.0}  # casefold: "hello" == "Hello"
    assert by["u:1+h:1 linear delta"].scores == {"up": 1.0, "hi": 0.0}
    assert by["u:1+h:1 ties d=0.5 delta"].scores == {"up": 1.0, "hi": 1.0}
    failed = by["u:1+h:1 linear factors"]
    assert failed.error.startswith("INVALID_ARGUMENT") and not failed.scores

    goal = parse_goal("min", suite, configs)
    assert goal.tasks == ("up", "hi")
    report = Report(suite, rows, goal)
    assert report.best is by["u:1+h:1 ties d=0.5 delta"]
    ranked = [r.config.name for r, _ in report.ranking]
    assert ranked[:2] == ["u:1+h:1 ties d=0.5 delta", "u:1+h:1 linear delta"]
    assert "Use: u:1+h:1 ties d=0.5 delta" in report.to_terminal()

    paths = report.write(tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["recommendation"]["name"] == "u:1+h:1 ties d=0.5 delta"
    assert [r["name"] for r in data["rows"]] == [c.name for c in configs]
    md = paths["markdown"].read_text()
    assert "| **u:1+h:1 ties d=0.5 delta** | 1.00 | 1.00 | 1.00 |" in md
    chart_check(paths["chart"], len(configs))


def test_own_tasks_only_skips_other_tasks() -> None:
    suite = parse_suite(SUITE)
    configs = grid(["u", "x"], weights=[(1, 1)])
    client = FakeClient()
    (row,) = asyncio.run(evaluate(client, suite, configs, own_tasks_only=True))
    assert row.scores == {"up": 1.0}
    assert [p for p, _ in client.calls] == ["up a"]


def test_cli_reports_bad_suite_with_exit_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"tasks": [{"name": "t", "scorer": "bleu", "prompts": [{"prompt": "p"}]}]}))
    assert cli_main(["eval", str(path), "--inference-addr", "127.0.0.1:1"]) == 2
    assert "suite.tasks[0].scorer must be one of" in capsys.readouterr().err


def test_pareto_front_maximises_both() -> None:
    from loramerge_client.eval import pareto_front

    pts = [(1.0, 0.0), (0.5, 0.5), (0.4, 0.4), (0.0, 1.0), (0.5, 0.5), (float("nan"), 1.0), (0.9, 0.2)]
    assert pareto_front(pts) == [0, 1, 3, 4, 6]  # (0.4, 0.4) is dominated; ties stay; NaN never
    assert pareto_front([]) == []


def test_retention_beside_scores_and_pareto_chart(tmp_path: Path, chart_check) -> None:
    from loramerge_client.eval import retention

    assert retention({"a": 0.5, "b": 0.2, "c": 1.0}, {"a": 0.8, "b": 0.0}) == {"a": 0.625}
    suite = parse_suite(SUITE)
    configs = baseline_configs(suite) + grid(["u", "h"], strategies=["linear", "ties"], weights=[(1, 1)])
    rows = asyncio.run(evaluate(FakeClient(), suite, configs))
    report = Report(suite, rows, parse_goal("min:up,hi", suite))
    assert report.own == {"up": 1.0, "hi": 1.0}
    by = {r.config.name: r for r in rows}
    assert report.retention(by["u:1+h:1 linear delta"]) == {"up": 1.0, "hi": 0.0}
    assert report.retention(by["u"]) == {}  # singles and the base have no retention
    assert "up:kept" in report.to_terminal() and "100%" in report.to_terminal()
    paths = report.write(tmp_path / "out")
    md = paths["markdown"].read_text()
    assert "| goal (min) | up kept | hi kept |" in md
    assert "| u:1+h:1 linear delta | 1.00 | 0.00 | 0.00 | 100% | 0% |" in md
    data = json.loads(paths["json"].read_text())
    assert data["rows"][-1]["retention"] == {"up": 1.0, "hi": 1.0}
    chart_check(paths["pareto"], 0)
    with pytest.raises(InvalidArgument, match=r"pareto tasks not in the suite: \['nope'\]"):
        report.write(tmp_path / "x", pareto=["up", "nope"])


def test_cli_bad_pareto_tasks_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(SUITE))
    argv = ["eval", str(path), "--pareto", "up,zzz", "--inference-addr", "127.0.0.1:1"]
    assert cli_main(argv) == 2
    assert "pareto tasks not in the suite: ['zzz']" in capsys.readouterr().err
