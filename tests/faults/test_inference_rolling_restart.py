"""A rolling restart of the inference service on real processes loses no call, on gRPC and on HTTP.

What it models: a replacement is ready before the old process gets SIGTERM, as in Kubernetes, where
a new pod (or another replica) takes traffic while the old one drains. On one host the replacement
shares the old one's gRPC and HTTP ports (``--reuse-port``, SO_REUSEPORT) and binds them only once
its engine is up, so no connection reaches a process still starting. Then the old one is SIGTERM'd:
it answers UNAVAILABLE / 503 + Retry-After + ``Connection: close`` for ``--drain-seconds``, lets its
calls in flight finish, and exits 0; clients move to the replacement.

Client loops, all with default retries, call a merged spec (so the replacement fetches the merge
itself) through the whole restart: our ``InferenceClient`` on one long-lived channel and with a new
channel per call, and the official ``openai`` SDK against /v1/completions with one client and with a
new client per call. Every call must succeed; every loop must have succeeded before and after.
Greedy tokens are the same on both processes.

Its wall time is two vLLM starts, one after the other (the second beside the old engine serving):
about 12 s each on an idle two-core machine, but 5 to 6 minutes in all were measured on the shared,
loaded one (load average 5 to 7), where each start took 90 to 180 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import openai
import pytest

from loramerge_client import InferenceClient, MergedAdapters, SamplingParams
from tests.e2e.conftest import (
    ENGINE_START_TIMEOUT_S,
    MAX_LORA_RANK,
    ServiceProcess,
    _child_env,
    _inference_ready,
    _merge_ready,
    free_port,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPT = "The quick brown fox"
TOKENS = 8
MERGED = {"ids": ["a", "b"], "weights": [0.5, 0.5]}
DRAIN_SECONDS = 1  # the old process answers UNAVAILABLE / 503 this long before it stops listening
AFTER_SECONDS = 3  # how long the loops run on the replacement alone, once each has been served by it
# A loop's next success can lag the old process's exit by its retry back-off (up to 2 s) plus a reconnect
# (back-off capped at 2 s) plus the call itself on a loaded machine: wait for it, within this bound.
REJOIN_SECONDS = 60
# Between two calls of a loop: clients with a little think time leave the two cores to the engines
# (four loops calling flat out starve the replacement's engine start on a shared two-core machine).
PAUSE_SECONDS = 0.1


@dataclass
class Loop:
    """One client loop: what it got, when, and every failure (with its type and message)."""

    name: str
    call: Callable[[], str]
    ok_times: list[float] = field(default_factory=list)
    texts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                text = self.call()
            except Exception as e:  # every failure counts, whatever the client raised
                self.failures.append(f"{type(e).__name__}: {e}")
                time.sleep(0.1)
                continue
            self.ok_times.append(time.monotonic())
            self.texts[text] += 1
            time.sleep(PAUSE_SECONDS)

    def ok_after(self, t: float) -> int:
        return sum(1 for x in self.ok_times if x > t)


def merge_process(adapter_root: Path, root: Path, port: int) -> ServiceProcess:
    argv = [
        sys.executable, "-m", "merge_service",
        "--listen", f"127.0.0.1:{port}", "--metrics-port", "0",
        "--adapter-root", str(adapter_root), "--device", "cpu",
        "--cache-dir", str(root / "merge-cache"),
        "--hub-cache-dir", str(root / "hub"), "--s3-cache-dir", str(root / "s3"),
        "--grace-seconds", "2", "--log-format", "json",
    ]  # fmt: skip
    return ServiceProcess(name="merge service", argv=argv, log_path=root / "merge.log", env=_child_env())


def engine_cores() -> tuple[str, str]:
    """VLLM_CPU_OMP_THREADS_BIND for the old process and its replacement: "nobind" for both (see the
    README's rolling-restart note). A worker pinned to a core pins its load there: vLLM's "auto" puts
    both workers on the same core, and with a core of its own each, the replacement's start still
    visits the old worker's core (MKL counts cores at torch import by moving the importing thread onto
    each in turn) and crawls there for minutes. Unpinned, the scheduler moves whichever it must."""
    return ("nobind", "nobind")


def inference_process(
    name: str,
    model: Path,
    merge_address: str,
    ports: tuple[int, int],
    adapter_dir: Path,
    root: Path,
    cores: str,
) -> ServiceProcess:
    ready = root / f"{name}-ready.json"
    argv = [
        sys.executable, "-m", "inference_service",
        "--model", str(model),
        "--listen", f"127.0.0.1:{ports[0]}", "--http-listen", f"127.0.0.1:{ports[1]}", "--reuse-port",
        "--metrics-port", "0",
        "--merge-service", merge_address,
        "--adapter-dir", str(adapter_dir),
        "--dtype", "float32", "--kv-cache-bytes", "64MiB", "--max-model-len", "512",
        "--max-lora-rank", str(MAX_LORA_RANK), "--max-loras", "4", "--max-cpu-loras", "8",
        "--ready-file", str(ready),
        "--fetch-timeout-ceiling-seconds", "60",
        "--drain-seconds", str(DRAIN_SECONDS), "--grace-seconds", "30",
        "--log-format", "json",
    ]  # fmt: skip
    env = _child_env()
    env["VLLM_CPU_OMP_THREADS_BIND"] = cores
    return ServiceProcess(
        name=f"inference service ({name})",
        argv=argv,
        log_path=root / f"{name}.log",
        env=env,
        extra={"ready_file": ready},
    )


def log_time(service: ServiceProcess, message: str) -> float:
    """Epoch seconds of the first JSON log record of ``service`` whose message is ``message``."""
    for line in service.log_text().splitlines():
        if line.startswith("{") and f'"{message}"' in line:
            record = json.loads(line)
            if record.get("msg") == message:
                return datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()
    raise AssertionError(f"{service.name} never logged {message!r}")


def test_inference_rolling_restart_on_the_same_ports_fails_no_call(
    tiny_llama: Path, adapter_root: Path, tmp_path: Path
) -> None:
    t_start = time.monotonic()
    grpc_port, http_port = free_port(), free_port()
    shm = Path("/dev/shm")
    adapter_dir = (shm if shm.is_dir() else tmp_path) / f"loramerge-roll-{os.getpid()}"
    merge_address = f"127.0.0.1:{free_port()}"
    merge = merge_process(adapter_root, tmp_path, int(merge_address.rsplit(":", 1)[1]))
    ports, (old_cores, new_cores) = (grpc_port, http_port), engine_cores()
    old = inference_process("old", tiny_llama, merge_address, ports, adapter_dir, tmp_path, old_cores)
    new = inference_process("new", tiny_llama, merge_address, ports, adapter_dir, tmp_path, new_cores)
    address, url = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}/v1"
    statuses: Counter[int] = Counter()  # HTTP answers the SDK saw, retries included

    def count(response: httpx.Response) -> None:
        statuses[response.status_code] += 1

    def sdk() -> openai.OpenAI:  # default retries (2) and timeout; the hook only counts
        return openai.OpenAI(
            base_url=url, api_key="unused", http_client=httpx.Client(event_hooks={"response": [count]})
        )

    sampling = SamplingParams(max_tokens=TOKENS)
    spec = MergedAdapters(ids=MERGED["ids"], weights=MERGED["weights"])
    loops: list[Loop] = []
    grpc_client: InferenceClient | None = None
    http_client: openai.OpenAI | None = None
    threads: list[threading.Thread] = []
    try:
        # The merge service starts beside the old process (which calls it only once serving).
        merge_starter = threading.Thread(target=merge.start, args=(_merge_ready, 120), daemon=True)
        merge_starter.start()
        old.start(_inference_ready, ENGINE_START_TIMEOUT_S)
        merge_starter.join(120)
        assert merge.running and merge.address == merge_address, merge.log_text()[-3000:]
        t_old_ready = time.monotonic()
        grpc_client = InferenceClient(address)
        http_client = sdk_client = sdk()

        def grpc_kept() -> str:
            assert grpc_client is not None
            return grpc_client.generate(PROMPT, spec, sampling).text

        def grpc_fresh() -> str:
            with InferenceClient(address) as c:
                return c.generate(PROMPT, spec, sampling).text

        def completion(client: openai.OpenAI) -> str:
            answer = client.completions.create(
                model="",
                prompt=PROMPT,
                max_tokens=TOKENS,
                temperature=0,
                extra_body={"merged_adapters": MERGED},
            )
            return answer.choices[0].text

        def http_fresh() -> str:
            with sdk() as c:
                return completion(c)

        loops = [
            Loop("grpc (one channel)", grpc_kept),
            Loop("grpc (channel per call)", grpc_fresh),
            Loop("openai (one client)", lambda: completion(sdk_client)),
            Loop("openai (client per call)", http_fresh),
        ]
        threads = [threading.Thread(target=loop.run, name=loop.name, daemon=True) for loop in loops]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while not all(loop.ok_times for loop in loops):
            assert time.monotonic() < deadline, [(lp.name, lp.failures[:3]) for lp in loops]
            time.sleep(0.05)

        # The replacement starts while the old one serves, and joins its ports once ready.
        t_new_start = time.monotonic()
        new.start(_inference_ready, ENGINE_START_TIMEOUT_S)
        t_new_ready = time.monotonic()
        assert old.proc is not None
        old.proc.send_signal(signal.SIGTERM)
        t_signal = time.monotonic()
        assert old.proc.wait(60) == 0, old.log_text()[-3000:]
        t_old_gone = time.monotonic()
        rejoin = t_old_gone + REJOIN_SECONDS
        while not all(loop.ok_after(t_old_gone) for loop in loops) and time.monotonic() < rejoin:
            time.sleep(0.05)
        time.sleep(AFTER_SECONDS)
    finally:
        for loop in loops:
            loop.stop.set()
        for t in threads:
            t.join(90)
        for c in (grpc_client, http_client):
            if c is not None:
                c.close()
        new.stop()
        old.stop()
        merge.stop()
        shutil.rmtree(adapter_dir, ignore_errors=True)

    stopped = log_time(old, "server stopped") - log_time(old, "received SIGTERM: draining")
    lines = []
    for loop in loops:
        before, after = len([x for x in loop.ok_times if x <= t_signal]), loop.ok_after(t_old_gone)
        total = len(loop.ok_times) + len(loop.failures)
        lines.append(
            f"  {loop.name}: {total} calls, {len(loop.failures)} failed, "
            f"{before} ok before SIGTERM, {after} ok after the old process exited"
        )
    print(
        f"\ninference rolling restart: old ready after {t_old_ready - t_start:.1f} s, replacement "
        f"start-up {t_new_ready - t_new_start:.1f} s "
        f"(while the old served); old process: drained in {stopped:.1f} s, exited "
        f"{t_old_gone - t_signal:.1f} s after SIGTERM (engine shutdown); "
        f"test wall {time.monotonic() - t_start:.1f} s; HTTP answers seen by the SDK {dict(statuses)}\n"
        + "\n".join(lines)
    )
    for loop in loops:
        assert not loop.failures, (loop.name, loop.failures[:5])
        assert any(x <= t_signal for x in loop.ok_times), f"{loop.name}: no call before SIGTERM"
        assert loop.ok_after(t_old_gone) > 0, f"{loop.name}: the replacement served no call"
    # Greedy: both processes gave every call the same tokens (the replacement fetched the same merge).
    assert len({text for loop in loops[:2] for text in loop.texts}) == 1, [lp.texts for lp in loops]
    assert len({text for loop in loops[2:] for text in loop.texts}) == 1, [lp.texts for lp in loops]
    assert "draining" in old.log_text() and "server stopped" in old.log_text()
    assert not Path(str(old.extra["ready_file"])).exists()


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-s"])
