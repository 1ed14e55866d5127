"""``loramerge`` plan / inspect / fetch / cache against the real merge service."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loramerge_client.cli import main
from tests.client.conftest import MergeServiceProc


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_fetch_inspect_cache(
    real_merge: MergeServiceProc, capsys, tmp_path: Path, adapter_root: Path
) -> None:
    addr = ["--merge-addr", real_merge.address]
    spec = [
        "-a",
        "a:0.6",
        "-a",
        "c:0.4",
        "--strategy",
        "dare_linear",
        "--density",
        "0.6",
        "--merge-seed",
        "3",
    ]

    code, out, _ = run(capsys, "plan", *spec, "--json", *addr)
    plan = json.loads(out)
    assert code == 0 and [a["id"] for a in plan["adapters"]] == ["a", "c"]
    assert plan["adapters"][1]["use_rslora"] is True
    assert plan["effective_spec"]["merge_strategy"] == "DARE_LINEAR"

    out_dir = tmp_path / "merged"
    code, out, _ = run(capsys, "fetch", *spec, "-o", str(out_dir), *addr)
    assert code == 0 and plan["merge_key"] in out
    code, out, _ = run(capsys, "inspect", str(out_dir), "--json")
    merged = json.loads(out)
    assert code == 0 and merged["r"] == plan["rank"] and merged["modules"] == 14

    code, out, _ = run(capsys, "inspect", "a", "--source", "local", *addr)
    assert code == 0 and "rank            8" in out and "alpha           16" in out

    code, out, _ = run(capsys, "cache", "--json", *addr)
    assert code == 0 and plan["merge_key"] in [e["merge_key"] for e in json.loads(out)["entries"]]


def test_real_bad_input_exit_codes(real_merge: MergeServiceProc, capsys) -> None:
    addr = ["--merge-addr", real_merge.address]
    code, _, err = run(capsys, "plan", "-a", "a", "-a", "e", "--strategy", "ties", *addr)  # no density
    assert code == 2 and "INVALID_ARGUMENT" in err and "density" in err
    code, _, err = run(capsys, "plan", "-a", "a", "-a", "nope", "--source", "local", *addr)
    assert code == 2 and "NOT_FOUND" in err
    code, _, err = run(capsys, "plan", "-a", "a", "-a", "d", *addr)
    assert code == 2 and "FAILED_PRECONDITION" in err


def test_plan_interference_table_and_json(real_merge: MergeServiceProc, capsys) -> None:
    addr = ["--merge-addr", real_merge.address]
    spec = ["-a", "a", "-a", "b", "-a", "a:-1"]
    code, out, _ = run(capsys, "plan", *spec, "--interference", "--modules", *addr)
    assert code == 0 and "interference (top sets at density 0.2" in out
    assert "a / b" in out and "(all)" in out and "q_proj" in out
    assert "a / a" in out and "-1.000" in out and "100.0%" in out  # an adapter against its negation
    code, out, _ = run(capsys, "plan", *spec, "--interference", "--json", *addr)
    rep = json.loads(out)["interference"]
    assert code == 0 and [(p.get("first", 0), p["second"]) for p in rep["pairs"]] == [(0, 1), (0, 2), (1, 2)]
    assert rep["pairs"][1]["overall"]["cosine"] == pytest.approx(-1.0)
