"""The client distribution on its own: a fresh virtual environment with only ``pip install ./clients``
has no torch and no service code, and still plans, merges to a folder and generates against the live
stack, from Python and from the ``loramerge`` command; the offline commands say what to install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

CALLS = """
import json, sys
from loramerge_client import InferenceClient, MergeClient, MergedAdapters, SamplingParams
merge_addr, inference_addr, out = sys.argv[1:4]
spec = MergedAdapters(ids=["a", "e"], weights=[0.6, 0.4])
with MergeClient(merge_addr, timeout=120) as merge:
    plan = merge.plan(spec)
    result = merge.merge(spec, output_dir=out)
with InferenceClient(inference_addr, timeout=120) as inference:
    reply = inference.generate("The quick brown fox", spec, SamplingParams(max_tokens=4, ignore_eos=True))
print(json.dumps({
    "plan_key": plan.merge_key, "merged_key": result.merge_key, "sha256": result.sha256,
    "used_key": reply.adapter.merge_key, "tokens": len(reply.token_ids),
}))
"""


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("client-only")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # A copy of clients/, so that the build leaves nothing in the checkout; grpcio and the other three
    # dependencies come from the package registry.
    source = shutil.copytree(
        REPO / "clients",
        root / "clients",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"),
    )
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, str(source)], check=True, env=_clean_env(), timeout=900)
    return venv


def _clean_env() -> dict[str, str]:
    """The environment without anything that would make the repository importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_only_the_contract_and_the_client_are_installed(client_venv: Path, tmp_path: Path) -> None:
    probe = (
        "import importlib.util as u, json; "
        "print(json.dumps({m: u.find_spec(m) is not None for m in "
        "('torch', 'vllm', 'safetensors', 'merge_service', 'inference_service', 'loramerge_common', "
        "'loramerge.v1.merge_pb2', 'loramerge.receiver', 'loramerge_client')}))"
    )
    found = json.loads(_run(client_venv, "python", "-c", probe, cwd=tmp_path).stdout)
    assert found == {
        "torch": False, "vllm": False, "safetensors": False, "merge_service": False,
        "inference_service": False, "loramerge_common": False,
        "loramerge.v1.merge_pb2": True, "loramerge.receiver": True, "loramerge_client": True,
    }  # fmt: skip


def test_real_calls_from_python_and_the_command(
    client_venv: Path, merge_service, inference_service, tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    done = _run(
        client_venv, "python", "-c", CALLS, merge_service.address, inference_service.address, str(out),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    assert facts["plan_key"] == facts["merged_key"] == facts["used_key"] and facts["tokens"] == 4
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}

    plan = _run(
        client_venv, "loramerge", "plan", "-a", "a:0.6", "-a", "e:0.4", "--merge-addr", merge_service.address,
        "--json", cwd=tmp_path,
    )  # fmt: skip
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["merge_key"] == facts["plan_key"]


def test_offline_commands_say_what_to_install(client_venv: Path, tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir()
    for argv in (
        ("loramerge", "merge", "-a", str(folder), "-o", str(tmp_path / "out")),
        ("loramerge", "inspect", str(folder)),
        ("loramerge", "tune", "suite.json", "--adapters", "a,b", "--goal", "min:a,b"),
    ):
        done = _run(client_venv, *argv, cwd=tmp_path)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, (argv, done.stderr)
        assert "pip install" in lines[0], (argv, lines)
