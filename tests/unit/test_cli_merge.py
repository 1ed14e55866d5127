"""``loramerge merge``: the offline command, run in-process, on the tiny adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramerge_client.cli import main
from loramerge_client.commands.merge import parse_adapter
from merge_service.spec import SourceKind
from tests.factories import lora_delta

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def test_merge_writes_a_peft_dir_and_prints_a_summary(
    adapter_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(adapter_root)
    out = tmp_path / "merged"
    rc = main(
        [
            "merge",
            "--adapter",
            "a:0.5",
            "--adapter",
            str(adapter_root / "c") + ":2",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--json",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert (
        summary["rank"] == 16 and summary["worst_relative_error"] == 0.0 and len(summary["merge_key"]) == 64
    )
    assert summary["bytes"] == (out / "adapter_model.safetensors").stat().st_size
    t = load_file(out / "adapter_model.safetensors")
    got = t[f"base_model.model.{Q}.lora_B.weight"] @ t[f"base_model.model.{Q}.lora_A.weight"]
    want = 0.5 * lora_delta(adapter_root / "a", Q) + 2 * lora_delta(adapter_root / "c", Q)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    record = json.loads((out / "loramerge.json").read_text())
    assert record["merge_key"] == summary["merge_key"]

    rc = main(
        [
            "merge",
            "-a",
            "a",
            "-a",
            "b",
            "--weights",
            "0.5,1",
            "--strategy",
            "dare_ties",
            "--density",
            "0.5",
            "--target-rank",
            "6",
            "--dtype",
            "bfloat16",
            "--out",
            str(tmp_path / "d"),
            "--device",
            "cpu",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0 and "merge key" in text and "worst error" in text and "seed" in text
    assert json.loads((tmp_path / "d" / "adapter_config.json").read_text())["r"] == 6


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-a", "a", "--strategy", "ties"], "spec.density is required"),
        (["-a", "a", "--strategy", "ties", "--density", "1.5"], "spec.density must be in (0, 1], got 1.5"),
        (["-a", "a", "-a", "b", "--space", "factors"], "use space=delta"),
        (["-a", "a", "-a", "./nope"], "no adapter directory at './nope'"),
        (["-a", "a", "-a", "d"], "same base model"),
        (["-a", "a", "-a", "b", "--weights", "1,2,3"], "--weights has 3 values for 2 adapters"),
        (["-a", "a:2", "-a", "b", "--weights", "1,2"], "not both"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    adapter_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(adapter_root)
    rc = main(["merge", *argv, "--out", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_unknown_strategy_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        main(["merge", "-a", "x", "--strategy", "della", "--out", str(tmp_path)])
    assert e.value.code == 2 and "invalid choice: 'della'" in capsys.readouterr().err


def test_parse_adapter_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "local").mkdir()
    monkeypatch.chdir(tmp_path)
    ref = parse_adapter("org/name@v1.0:0.25", 0)
    assert (ref.id, ref.revision, ref.weight, ref.source) == ("org/name", "v1.0", 0.25, SourceKind.HUB)
    ref = parse_adapter("local:-1", 0)
    assert (ref.id, ref.weight, ref.source) == ("local", -1.0, SourceKind.LOCAL)
    assert parse_adapter("org/name", 0).weight == 1.0
