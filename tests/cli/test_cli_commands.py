"""Each ``loramerge`` subcommand against scripted servicers: its output (plain and --json) and its
exit status (0 ok, 2 bad input, 3 unavailable, 1 other)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loramerge import errors as E
from loramerge.v1 import merge_pb2
from loramerge_client.cli import main
from loramerge_client.progress import Eta, ProgressBar, format_eta, render
from tests.client.conftest import FakeStack
from tests.client.fakes import WEIGHTS


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def inf(fakes: FakeStack) -> list[str]:
    return ["--inference-addr", fakes.address]


def mrg(fakes: FakeStack) -> list[str]:
    return ["--merge-addr", fakes.address]


def test_generate_merged(fakes: FakeStack, capsys) -> None:
    args = ["-a", "a:0.6", "-a", "b:0.4", "--strategy", "TIES", "--density", "0.5", "-n", "8"]
    code, out, _ = run(capsys, "generate", "hi there", *args, *inf(fakes))
    assert (code, out) == (0, "echo: hi there\n")
    req = fakes.inference.seen.requests[-1]
    spec = req.merged_adapters
    assert [(a.id, round(a.weight, 3)) for a in spec.adapters] == [("a", 0.6), ("b", 0.4)]
    assert spec.merge_strategy == merge_pb2.TIES and spec.density == pytest.approx(0.5)
    assert req.sampling.max_tokens == 8 and not req.adapter_id


def test_generate_single_adapter_and_merge_json(fakes: FakeStack, capsys, tmp_path: Path) -> None:
    assert run(capsys, "generate", "x", "-a", "org/one", *inf(fakes))[0] == 0
    req = fakes.inference.seen.requests[-1]
    assert req.adapter_id == "org/one" and not req.HasField("merged_adapters")

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"ids": ["a", "b"], "weights": [1, 2], "merge_strategy": "DARE_LINEAR"}))
    assert run(capsys, "generate", "x", "--merge", f"@{spec_file}", "--density", "0.3", *inf(fakes))[0] == 0
    spec = fakes.inference.seen.requests[-1].merged_adapters
    assert list(spec.ids) == ["a", "b"] and spec.merge_strategy == merge_pb2.DARE_LINEAR
    assert spec.density == pytest.approx(0.3)


def test_generate_stream_and_json(fakes: FakeStack, capsys) -> None:
    code, out, _ = run(capsys, "generate", "one two three", "--stream", *inf(fakes))
    assert (code, out) == (0, "one two three\n")

    code, out, _ = run(capsys, "generate", "hello", "--json", *inf(fakes))
    assert code == 0 and json.loads(out)["text"] == "echo: hello"

    code, out, _ = run(capsys, "generate", "a b", "--stream", "--json", *inf(fakes))
    lines = [json.loads(line) for line in out.splitlines()]
    assert [m["text"] for m in lines] == ["a ", "b"] and lines[-1]["finish_reason"] == "STOP"


def test_generate_bad_input_exits_2(fakes: FakeStack, capsys) -> None:
    code, out, err = run(capsys, "generate", "x", "-a", "a", "-a", "b", "--strategy", "avg", *inf(fakes))
    assert code == 2 and out == "" and "--strategy" in err and "'avg'" in err
    assert fakes.inference.seen.requests == []  # rejected before any call

    fakes.inference.fail = [
        E.InvalidArgument("spec.density must be in (0, 1], got 1.5", field="spec.density")
    ]
    code, _, err = run(capsys, "generate", "x", "-a", "a", "-a", "b", "--density", "1.5", *inf(fakes))
    assert code == 2 and "INVALID_ARGUMENT" in err and "got 1.5" in err

    fakes.inference.fail = [E.NotFound("adapter 'zz' not found", field="adapter_id")]
    code, _, err = run(capsys, "generate", "x", "-a", "zz", "--json", *inf(fakes))
    body = json.loads(err)["error"]
    assert code == 2 and body["code"] == "NOT_FOUND" and body["violations"][0]["field"] == "adapter_id"

    fakes.inference.fail = [E.FailedPrecondition("rank 64 above max_lora_rank 16", field="spec.target_rank")]
    assert run(capsys, "generate", "x", *inf(fakes))[0] == 2

    with pytest.raises(SystemExit) as info:  # argparse: missing prompt
        main(["generate"])
    assert info.value.code == 2


def test_unavailable_exits_3_and_other_errors_1(fakes: FakeStack, capsys) -> None:
    code, _, err = run(capsys, "generate", "x", "--inference-addr", "127.0.0.1:1", "--retries", "0")
    assert code == 3 and "UNAVAILABLE" in err
    fakes.inference.delay = 2.0
    assert run(capsys, "generate", "x", "--timeout", "0.2", *inf(fakes))[0] == 3  # DEADLINE_EXCEEDED
    fakes.inference.delay = 0.0
    fakes.inference.fail = [E.Internal("boom")]
    assert run(capsys, "generate", "x", *inf(fakes))[0] == 1


def test_plan(fakes: FakeStack, capsys) -> None:
    code, out, _ = run(
        capsys, "plan", "-a", "a:0.5", "-a", "b:0.5", "--strategy", "ties", "--density", "0.4", *mrg(fakes)
    )
    assert code == 0
    assert "merge key   key-1" in out and "cached      no" in out
    assert "ties, density 0.4, sign total, space delta" in out
    assert out.count("local") == 2
    code, out, _ = run(capsys, "plan", "-a", "a", "--json", *mrg(fakes))
    assert code == 0 and json.loads(out)["merge_key"] == "key-1"
    code, _, err = run(capsys, "plan", *mrg(fakes))
    assert code == 2 and "--adapter" in err


def test_inspect_local_and_remote(fakes: FakeStack, capsys, adapter_root: Path) -> None:
    code, out, _ = run(capsys, "inspect", str(adapter_root / "b"))
    assert code == 0 and "rank            4" in out and "q_proj" in out
    code, out, _ = run(capsys, "inspect", str(adapter_root / "c"), "--json")
    info = json.loads(out)
    assert code == 0 and info["r"] == 8 and info["use_rslora"] is True
    assert (
        info["modules"] == 14
        and info["bytes"] == (adapter_root / "c" / "adapter_model.safetensors").stat().st_size
    )

    code, out, _ = run(capsys, "inspect", "org/remote", *mrg(fakes))
    assert code == 0 and "org/remote" in out and "digest" in out
    assert fakes.merge.seen.requests[-1].spec.adapters[0].id == "org/remote"


def test_inspect_broken_folder_exits_2(capsys, tmp_path: Path, adapter_root: Path) -> None:
    (tmp_path / "adapter_config.json").write_text((adapter_root / "a" / "adapter_config.json").read_text())
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 5)
    code, _, err = run(capsys, "inspect", str(tmp_path))
    assert code == 2 and "safetensors" in err


def test_fetch_writes_and_loads_with_progress(fakes: FakeStack, capsys, tmp_path: Path) -> None:
    out_dir = tmp_path / "merged"
    code, out, err = run(
        capsys,
        "fetch",
        "-a",
        "a",
        "-a",
        "b",
        "-o",
        str(out_dir),
        "--load",
        "--progress",
        *mrg(fakes),
        *inf(fakes),
    )
    assert code == 0
    assert (out_dir / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert "merge key" in out and "m-1" in out
    assert "merge" in err and "2/2" in err  # progress lines (forced on, stderr is not a terminal)
    assert fakes.inference.loaded[-1][1] == WEIGHTS

    code, out, err = run(capsys, "fetch", "-a", "a", "-o", str(tmp_path / "quiet"), "--json", *mrg(fakes))
    assert code == 0 and err == "" and json.loads(out)["header"]["merge_key"] == "key-1"
    assert run(capsys, "fetch", "-a", "a", *mrg(fakes))[0] == 2  # nothing to do


def test_health(fakes: FakeStack, capsys) -> None:
    code, out, _ = run(capsys, "health", *mrg(fakes), *inf(fakes))
    assert code == 0 and out.count("SERVING") == 2
    code, out, _ = run(capsys, "health", "--json", "--merge-addr", "127.0.0.1:1", *inf(fakes))
    statuses = {r["service"]: r["status"] for r in json.loads(out)}
    assert code == 3 and statuses == {"merge": "UNAVAILABLE", "inference": "SERVING"}


def test_cache_and_adapters(fakes: FakeStack, capsys) -> None:
    code, out, _ = run(capsys, "cache", *mrg(fakes))
    assert code == 0 and "key-1" in out
    assert run(capsys, "cache", "evict", "--all", *mrg(fakes))[1] == "evicted 5\n"
    assert run(capsys, "cache", "evict", *mrg(fakes))[0] == 2
    code, out, _ = run(capsys, "adapters", "--json", *inf(fakes))
    assert code == 0 and json.loads(out)["adapters"][0]["name"] == "m-1"
    assert run(capsys, "adapters", "unload", "key-1", *inf(fakes))[0] == 0
    assert run(capsys, "adapters", "unload", "other", *inf(fakes))[0] == 2


def test_progress_bar_redraws_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    with ProgressBar(tty) as bar:
        for done in range(3):
            bar(merge_pb2.MergeProgress(stage="merge", done=done, total=2))
    assert tty.getvalue().count("\r") == 3 and tty.getvalue().endswith("2/2\n")
    pipe = io.StringIO()
    with ProgressBar(pipe) as bar:  # not a terminal: silent by default
        bar(merge_pb2.MergeProgress(stage="merge", done=1, total=2))
    assert pipe.getvalue() == "" and bar.events == 1
    assert render("svd", 1, 4, width=8) == "svd            [##......] 1/4"


def test_progress_bar_shows_modules_done_of_total_with_an_eta() -> None:
    """The merge stage counts modules; the ETA comes from the stage's rate so far."""

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    now = [100.0]
    tty = Tty()
    with ProgressBar(tty, clock=lambda: now[0]) as bar:
        bar(merge_pb2.MergeProgress(stage="merge", done=0, total=224))
        assert tty.getvalue().endswith("0/224 modules")  # no rate yet: no ETA
        now[0] += 10.0
        bar(merge_pb2.MergeProgress(stage="merge", done=56, total=224))
        assert tty.getvalue().endswith("56/224 modules, ETA 0:30")  # 168 left at 5.6 a second
        now[0] += 30.0
        bar(merge_pb2.MergeProgress(stage="merge", done=224, total=224))
    assert tty.getvalue().endswith("\x1b[K" + "merge".ljust(14) + " [" + "#" * 28 + "] 224/224\n")
    eta = Eta(clock=lambda: now[0])
    assert eta("load", 0, 4) is None
    now[0] += 2.0
    assert eta("load", 1, 4) == pytest.approx(6.0)
    assert eta("merge", 0, 10) is None  # a new stage starts its own rate
    assert format_eta(7) == "0:07" and format_eta(245) == "4:05" and format_eta(3723) == "1:02:03"
    assert (
        render("merge", 3, 10, width=4, unit="modules", eta=65)
        == "merge          [#...] 3/10 modules, ETA 1:05"
    )


def test_console_script_entry_point(fakes: FakeStack) -> None:
    exe = Path(sys.executable).with_name("loramerge")
    proc = subprocess.run(
        [str(exe), "health", "--service", "merge", "--merge-addr", fakes.address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "SERVING" in proc.stdout
    proc = subprocess.run([str(exe), "generate"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
