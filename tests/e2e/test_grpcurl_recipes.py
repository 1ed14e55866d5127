"""Every grpcurl recipe in clients/grpcurl/ against both real services (grpcurl is the oracle for
the wire format: it knows the services only through reflection)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

RECIPES = Path(__file__).resolve().parents[2] / "clients" / "grpcurl"


@pytest.fixture(scope="module")
def env(merge_service, inference_service) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "MERGE_ADDR": merge_service.address,
        "INFERENCE_ADDR": inference_service.address,
        "GRPCURL_FLAGS": "-max-time 120",
    }


def recipe(env: dict[str, str], *argv: str, stdin: str | None = None, shell: str | None = None):
    cmd = shell if shell is not None else [str(RECIPES / argv[0]), *argv[1:]]
    return subprocess.run(
        cmd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        shell=shell is not None,
        cwd=RECIPES,
    )


def messages(text: str) -> list[dict]:
    """grpcurl prints one pretty JSON object per message, back to back."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)
    return out


def test_merge_service_recipes(env: dict[str, str]) -> None:
    plan = recipe(env, "plan.sh")
    assert plan.returncode == 0, plan.stderr
    key = messages(plan.stdout)[0]["merge_key"]

    merged = recipe(env, "merge.sh")
    assert merged.returncode == 0, merged.stderr
    msgs = messages(merged.stdout)
    header = next(m["header"] for m in msgs if "header" in m)
    trailer = msgs[-1]["trailer"]
    assert trailer["sha256"] == header["sha256"] and trailer["total_bytes"] == header["total_bytes"]
    assert sum(1 for m in msgs if "data" in m) >= 1

    cached = messages(recipe(env, "list_cached.sh").stdout)[0]
    assert header["merge_key"] in [e["merge_key"] for e in cached["entries"]]
    evicted = recipe(env, "evict.sh", header["merge_key"])
    assert evicted.returncode == 0 and messages(evicted.stdout)[0]["evicted"] == 1
    assert recipe(env, "evict.sh", "--all").returncode == 0
    assert recipe(env, "evict.sh").returncode == 2  # usage
    assert key  # plan.sh's DARE_TIES spec resolved to a key

    bad = recipe(env, "plan.sh", '{"spec": {"ids": ["a", "b"], "merge_strategy": "TIES", "density": 1.5}}')
    assert bad.returncode == 64 + 3  # INVALID_ARGUMENT
    assert "density" in bad.stderr and "google.rpc.BadRequest" in bad.stderr


def test_inference_service_recipes(env: dict[str, str], tmp_path: Path) -> None:
    gen = recipe(env, "generate.sh")
    assert gen.returncode == 0, gen.stderr
    resp = messages(gen.stdout)[0]
    assert resp["text"] and resp["adapter"]["merge_key"]

    stream = recipe(env, "generate_stream.sh")
    assert stream.returncode == 0, stream.stderr
    parts = messages(stream.stdout)
    assert parts[0]["adapter"]["name"] and parts[-1]["finish_reason"] in ("STOP", "LENGTH")

    # A Merge stream piped straight into LoadAdapter (grpcurl reads the client stream from stdin).
    piped = recipe(env, shell="./merge.sh | ./load_adapter.sh")
    assert piped.returncode == 0, piped.stderr
    loaded = messages(piped.stdout)[0]
    adapters = messages(recipe(env, "list_adapters.sh").stdout)[0]["adapters"]
    assert loaded["merge_key"] in [a["merge_key"] for a in adapters]
    assert messages(recipe(env, "unload_adapter.sh", loaded["merge_key"]).stdout)[0]["unloaded"] is True

    # A PEFT folder pushed by the recipe's own chunking (jq + base64), under a chosen key.
    folder = tmp_path / "adapter"
    merged = messages(recipe(env, "merge.sh").stdout)
    header = next(m["header"] for m in merged if "header" in m)
    folder.mkdir()
    (folder / "adapter_config.json").write_text(header["adapter_config_json"])
    data = b"".join(base64.b64decode(m["data"]["data"]) for m in merged if "data" in m)
    (folder / "adapter_model.safetensors").write_bytes(data)
    pushed = recipe(env, "load_adapter.sh", str(folder), "recipe-pushed")
    assert pushed.returncode == 0, pushed.stderr
    pushed_key = messages(pushed.stdout)[0]["merge_key"]  # the claimed key is ignored
    assert pushed_key == "pushed:" + hashlib.sha256(data).hexdigest()
    unload = recipe(env, "unload_adapter.sh", pushed_key)
    assert messages(unload.stdout)[0]["unloaded"] is True

    health = recipe(env, "health.sh")
    assert health.returncode == 0 and health.stdout.count("SERVING") == 2
    listing = recipe(env, "describe.sh", env["INFERENCE_ADDR"])
    assert "loramerge.v1.InferenceService" in listing.stdout
