"""End-to-end fixtures: the real merge service and the real inference service (vLLM) as subprocesses.

Both run on loopback with ephemeral ports, on the session's ``tiny_llama`` and ``adapter_root``.
Starting vLLM takes tens of seconds, so one inference service serves the whole session: tests
must leave it usable (they may load and unload adapters, not change settings).

Fixtures:

- ``merge_service`` -> ``ServiceProcess``: ``python -m merge_service`` with
  ``--adapter-root adapter_root`` (adapter ids are the directory names: "a", "b", "c", "d", "e").
  ``merge_service.restart()`` stops and restarts it on the same ports (tests of the inference
  service while the merge service is down use ``merge_service.stop()`` then ``restart()``).
- ``inference_service`` -> ``ServiceProcess``: ``python -m inference_service`` on ``tiny_llama``
  (float32, 64 MiB KV cache, max_lora_rank 16, max_model_len 512), fetching from ``merge_service``.
  ``inference_service.adapter_dir`` is where its received adapters live.
- ``merge_stub`` / ``inference_stub``: generated sync stubs on insecure loopback channels.

``ServiceProcess.metric(name, labels)`` reads one Prometheus sample from the service's /metrics,
and ``.log_text()`` returns what it logged (attached to failures for diagnosis).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loramerge.v1 import inference_pb2_grpc, merge_pb2_grpc
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
ENGINE_START_TIMEOUT_S = 300  # vLLM start-up on a busy two-core machine
MAX_LORA_RANK = 16


@dataclass
class ServiceProcess:
    """One service subprocess: where it listens, its log, and how to stop or restart it."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    address: str = ""
    port: int = 0
    metrics_port: int = 0
    proc: subprocess.Popen | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def start(self, ready: Callable[[ServiceProcess], bool], timeout: float) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            self.argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}"
                )
            if ready(self):
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"{self.name} not ready after {timeout} s:\n{self.log_text()[-4000:]}")

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (graceful drain), then SIGKILL of the process group if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample's value (0.0 when absent); ``name`` includes any suffix such as _total."""
        want = labels or {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in want.items()):
                    return sample.value
        return 0.0


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded in tests
    return env


def _merge_ready(svc: ServiceProcess) -> bool:
    """The merge service logs one JSON line "server started" with its bound port."""
    for line in svc.log_text().splitlines():
        if '"server started"' in line:
            try:
                info = json.loads(line)
            except ValueError:
                continue
            svc.port = int(info["port"])
            svc.address = f"127.0.0.1:{svc.port}"
            return True
    return False


def _inference_ready(svc: ServiceProcess) -> bool:
    ready_file = Path(str(svc.extra["ready_file"]))
    if not ready_file.exists():
        return False
    info = json.loads(ready_file.read_text())
    svc.address, svc.port = info["address"], int(info["port"])
    if info.get("http_port"):
        svc.extra["http_url"] = f"http://127.0.0.1:{info['http_port']}"
    return True


class MergeServiceProcess(ServiceProcess):
    def restart(self, timeout: float = 120) -> None:
        """Stop (if running) and start again on the same gRPC and metrics ports."""
        self.stop()
        self.log_path.write_text("")
        self.argv[self.argv.index("--listen") + 1] = f"127.0.0.1:{self.port}"
        self.start(_merge_ready, timeout)


@pytest.fixture(scope="session")
def merge_service(
    adapter_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MergeServiceProcess]:
    """``python -m merge_service`` serving the adapters under ``adapter_root`` (memory cache only)."""
    logs = tmp_path_factory.mktemp("merge-service")
    metrics_port = free_port()
    svc = MergeServiceProcess(
        name="merge service",
        argv=[
            sys.executable, "-m", "merge_service",
            "--listen", "127.0.0.1:0",
            "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1",
            "--adapter-root", str(adapter_root),
            "--device", "cpu",
            "--grace-seconds", "1",
            "--log-format", "json",
        ],
        log_path=logs / "merge-service.log",
        env=_child_env(),
        metrics_port=metrics_port,
    )  # fmt: skip
    svc.start(_merge_ready, timeout=120)
    try:
        yield svc
    finally:
        svc.stop()


RECIPES = {
    "ab-linear": {
        "adapters": [{"id": "a", "weight": 0.6}, {"id": "b", "weight": 0.4}],
        "merge_strategy": "LINEAR",
    },
    "ab-ties": {"ids": ["a", "b"], "weights": [1.0, 0.5], "merge_strategy": "TIES", "density": 0.7},
}


def write_recipes(path: Path) -> Path:
    """The session's recipe file (YAML; the test suite also reads RECIPES)."""
    import yaml

    path.write_text(yaml.safe_dump(RECIPES))
    return path


@pytest.fixture(scope="session")
def inference_service(
    tiny_llama: Path, merge_service: MergeServiceProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """``python -m inference_service`` with vLLM on ``tiny_llama``, fetching merges from ``merge_service``."""
    work = tmp_path_factory.mktemp("inference-service")
    adapter_dir = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
    adapter_dir = adapter_dir / f"loramerge-test-{os.getpid()}"
    metrics_port = free_port()
    svc = ServiceProcess(
        name="inference service",
        argv=[
            sys.executable, "-m", "inference_service",
            "--model", str(tiny_llama),
            "--listen", "127.0.0.1:0",
            "--http-listen", "127.0.0.1:0",
            "--recipes", str(write_recipes(work / "recipes.yaml")),
            "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1",
            "--merge-service", merge_service.address,
            "--adapter-dir", str(adapter_dir),
            "--dtype", "float32",
            "--kv-cache-bytes", "64MiB",
            "--max-model-len", "512",
            "--max-lora-rank", str(MAX_LORA_RANK),
            "--max-loras", "4",
            "--max-cpu-loras", "8",
            "--ready-file", str(work / "ready.json"),
            "--fetch-timeout-ceiling-seconds", "60",
            "--merge-retry-max-seconds", "0.5",
            "--grace-seconds", "2",
            "--log-format", "json",
        ],
        log_path=work / "inference-service.log",
        env=_child_env(),
        metrics_port=metrics_port,
        extra={"ready_file": work / "ready.json", "adapter_dir": adapter_dir},
    )  # fmt: skip
    svc.start(_inference_ready, timeout=ENGINE_START_TIMEOUT_S)
    try:
        yield svc
    finally:
        svc.stop()
        shutil.rmtree(adapter_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def merge_stub(merge_service: ServiceProcess) -> Iterator[merge_pb2_grpc.MergeServiceStub]:
    with grpc.insecure_channel(merge_service.address) as channel:
        yield merge_pb2_grpc.MergeServiceStub(channel)


@pytest.fixture(scope="session")
def inference_stub(inference_service: ServiceProcess) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    with grpc.insecure_channel(inference_service.address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)
