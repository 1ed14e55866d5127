"""Start the merge service and the inference service on the demo assets, and stop them cleanly.

Both run as child processes in their own process groups (vLLM spawns workers of its own), log to
files, and bind loopback; stopping sends SIGTERM (graceful drain), then SIGKILL to the whole group if
anything lingers, so nothing is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from demo.assets import BASE_MODEL_NAME, REPO_ROOT, DemoAssets

ENGINE_START_TIMEOUT_S = 600  # vLLM start-up on a busy two-core machine
MAX_LORA_RANK = 64  # dense merges (TIES, DARE) are truncated to this rank; 64 of 128 dims


class ServiceError(RuntimeError):
    pass


@dataclass
class Service:
    name: str
    argv: list[str]
    log_path: Path
    ready_file: Path | None  # None: readiness is the JSON log line "server started"
    address: str = ""
    http_url: str = ""  # the inference service's OpenAI/LoRAX HTTP API, once ready
    proc: subprocess.Popen | None = None

    def start(self, env: dict[str, str]) -> None:
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def poll_ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise ServiceError(f"{self.name} exited with {code}; last log lines:\n{self.log_tail()}")
        info = self._ready_info()
        if info is None:
            return False
        self.address = f"127.0.0.1:{info['port']}"
        if info.get("http_port"):
            self.http_url = f"http://127.0.0.1:{info['http_port']}"
        return True

    def _ready_info(self) -> dict | None:
        if self.ready_file is not None:
            if not self.ready_file.is_file():
                return None
            with contextlib.suppress(ValueError):
                return json.loads(self.ready_file.read_text())
            return None
        for line in self.log_path.read_text(errors="replace").splitlines():
            if '"server started"' in line:
                with contextlib.suppress(ValueError):
                    return json.loads(line)
        return None

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM, then SIGKILL of the process group after ``grace`` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # vLLM workers left in the group, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


# Served by name on every API: the merge the demo's grid finds keeps both skills.
DEMO_RECIPES = {
    "facts-upper": {
        "adapters": [{"id": "facts", "weight": 1.2}, {"id": "upper", "weight": 1.0}],
        "merge_strategy": "LINEAR",
    }
}


@dataclass
class DemoServices:
    """Both services on ``assets``; addresses are known once ``start`` returns."""

    assets: DemoAssets
    work_dir: Path
    merge_listen: str = "127.0.0.1:0"
    inference_listen: str = "127.0.0.1:0"
    http_listen: str = "127.0.0.1:0"
    merge_metrics_port: int = 0
    inference_metrics_port: int = 0
    services: list[Service] = field(default_factory=list)
    adapter_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        shm = Path("/dev/shm")
        self.adapter_dir = (shm if shm.is_dir() else self.work_dir) / f"loramerge-demo-{os.getpid()}"

    @property
    def merge(self) -> Service:
        return self.services[0]

    @property
    def inference(self) -> Service:
        return self.services[1]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        env["HF_HUB_OFFLINE"] = "1"  # everything is local
        return env

    def start(self, progress: Callable[[str], None] = lambda _m: None) -> None:
        env = self._env()
        common = ["--log-format", "json", "--grace-seconds", "5"]
        merge = Service(
            "merge service",
            [
                sys.executable, "-m", "merge_service",
                "--listen", self.merge_listen,
                "--metrics-port", str(self.merge_metrics_port), "--metrics-host", "127.0.0.1",
                "--adapter-root", str(self.assets.root / "adapters"),
                "--device", "cpu",
                *common,
            ],
            self.work_dir / "merge-service.log",
            None,
        )  # fmt: skip
        self.services = [merge]
        merge.start(env)
        self._wait([merge], 120, progress)
        inference = Service(
            "inference service",
            [
                sys.executable, "-m", "inference_service",
                "--model", str(self.assets.base_dir),
                "--served-model-name", BASE_MODEL_NAME,
                "--listen", self.inference_listen,
                "--http-listen", self.http_listen,
                "--recipes", str(self._write_recipes()),
                "--metrics-port", str(self.inference_metrics_port), "--metrics-host", "127.0.0.1",
                "--merge-service", merge.address,
                "--adapter-dir", str(self.adapter_dir),
                "--dtype", "float32",
                "--kv-cache-bytes", "64MiB",
                "--max-model-len", "64",
                "--max-lora-rank", str(MAX_LORA_RANK),
                "--max-loras", "4",
                "--max-cpu-loras", "8",
                "--ready-file", str(self.work_dir / "inference-ready.json"),
                *common,
            ],
            self.work_dir / "inference-service.log",
            self.work_dir / "inference-ready.json",
        )  # fmt: skip
        self.services.append(inference)
        inference.start(env)
        self._wait([inference], ENGINE_START_TIMEOUT_S, progress)

    def _write_recipes(self) -> Path:
        path = self.work_dir / "recipes.json"
        path.write_text(json.dumps(DEMO_RECIPES, indent=2) + "\n")
        return path

    def _wait(self, services: list[Service], timeout: float, progress: Callable[[str], None]) -> None:
        deadline = time.monotonic() + timeout
        t0 = time.monotonic()
        last = 0.0
        while True:
            if all(s.poll_ready() for s in services):
                return
            now = time.monotonic()
            if now > deadline:
                names = ", ".join(s.name for s in services)
                raise ServiceError(f"{names} not ready after {timeout:.0f}s; log:\n{services[-1].log_tail()}")
            if now - last >= 10:
                progress(f"waiting for the {services[-1].name} ({now - t0:.0f}s)")
                last = now
            time.sleep(0.2)

    def stop(self) -> None:
        for svc in reversed(self.services):
            svc.stop()
        shutil.rmtree(self.adapter_dir, ignore_errors=True)

    def __enter__(self) -> DemoServices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running(assets: DemoAssets, work_dir: Path, progress: Callable[[str], None] = lambda _m: None,
            **kwargs: object) -> Iterator[DemoServices]:  # fmt: skip
    services = DemoServices(assets, work_dir, **kwargs)  # type: ignore[arg-type]
    try:
        services.start(progress)
        yield services
    finally:
        services.stop()
