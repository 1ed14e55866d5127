"""A rolling restart on real processes loses no call: four threads of our own MergeClient (default
retries) call Plan through a SIGTERM'd merge service and its replacement on the same port, and not
one call fails. Draining answers UNAVAILABLE (retried), never CANCELLED (not retried)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from loramerge.errors import LoramergeError
from loramerge_client import MergeClient
from tests.ports import free_port
from tests.service.test_merge_sigterm import start_service


def test_rolling_restart_on_the_same_port_fails_no_call(adapter_root: Path, tmp_path: Path) -> None:
    port = free_port()
    args = [
        "--listen", f"127.0.0.1:{port}", "--metrics-port", "0", "--adapter-root", str(adapter_root),
        "--cache-dir", str(tmp_path / "cache"), "--grace-seconds", "10", "--device", "cpu",
        "--hub-cache-dir", str(tmp_path / "hub"), "--s3-cache-dir", str(tmp_path / "s3"),
    ]  # fmt: skip
    env = dict(os.environ)
    old, _, _ = start_service(args, env)
    replacement = None
    calls: Counter[str] = Counter()
    failures: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def loop() -> None:
        with MergeClient(f"127.0.0.1:{port}", timeout=15) as client:
            while not stop.is_set():
                try:
                    client.plan({"ids": ["a", "b"], "weights": [0.5, 0.5]})
                    outcome = "ok"
                except LoramergeError as e:
                    outcome = "failed"
                    with lock:
                        failures.append(f"{e.code.name}: {e}")
                with lock:
                    calls[outcome] += 1

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(2)
        before = calls["ok"]
        assert before > 0
        old.send_signal(signal.SIGTERM)
        assert old.wait(30) == 0
        t0 = time.monotonic()
        replacement, _, _ = start_service(args, env)
        startup = time.monotonic() - t0
        served_by_old = calls["ok"]
        # The loops come back within their retry back-off (up to 2 s) plus a reconnect (capped at 2 s)
        # plus a first Plan on a cold process; on a loaded machine that took more than 3 s once.
        rejoin = time.monotonic() + 30
        while calls["ok"] <= served_by_old and time.monotonic() < rejoin:
            time.sleep(0.05)
        assert calls["ok"] > served_by_old, "the replacement served no call"
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        for p in (old, replacement):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    total = sum(calls.values())
    print(f"\nrolling restart: {total} calls, {len(failures)} failed, start-up {startup:.1f} s")
    assert not failures, failures[:5]


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-s"])
