"""`python -m merge_service` as a real process: SIGTERM while a stream is in flight lets the stream
finish, refuses new calls, and exits 0; the Hub token never reaches the logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from loramerge.v1 import merge_pb2, merge_pb2_grpc
from merge_service.cache import DiskTier, sha256_hex
from merge_service.merged import MergedAdapter

TOKEN_MARKER = "hf_neverLogThisToken123"


def start_service(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "merge_service", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    lines: list[str] = []
    started = threading.Event()
    port: list[int] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if '"server started"' in line:
                port.append(json.loads(line)["port"])
                started.set()

    threading.Thread(target=pump, daemon=True).start()
    if not started.wait(120):
        proc.kill()
        pytest.fail("merge service did not start:\n" + "".join(lines[-30:]))
    return proc, lines, port[0]


def test_sigterm_finishes_the_stream_in_flight_and_refuses_new_calls(
    adapter_root: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    env = {**os.environ, "HF_TOKEN": TOKEN_MARKER, "LORAMERGE_MERGE_CHUNK_BYTES": "64KiB"}
    args = [
        "--listen", "127.0.0.1:0", "--metrics-port", "0", "--adapter-root", str(adapter_root),
        "--cache-dir", str(cache_dir), "--grace-seconds", "30", "--device", "cpu", "--log-level", "DEBUG",
        "--hub-cache-dir", str(tmp_path / "hub"), "--s3-cache-dir", str(tmp_path / "s3"),
    ]  # fmt: skip
    proc, lines, port = start_service(args, env)
    try:
        address = f"127.0.0.1:{port}"
        spec = merge_pb2.MergeSpec(ids=["a", "b"], weights=[0.5, 0.5])
        with grpc.insecure_channel(address) as ch:
            stub = merge_pb2_grpc.MergeServiceStub(ch)
            key = stub.Plan(merge_pb2.MergeRequest(spec=spec), timeout=60).merge_key
            # A 32 MiB cached entry under the real key, through the disk tier the process reads: the
            # stream is long enough to be in flight when the signal lands.
            data = os.urandom(32 << 20)
            DiskTier(cache_dir, 1 << 30).put(
                MergedAdapter(key, "{}", data, sha256_hex(data), 12, (), "tiny", 0.0)
            )

            stream = stub.Merge(merge_pb2.MergeRequest(spec=spec), timeout=120)
            header = next(stream).header
            assert header.merge_key == key and header.total_bytes == len(data)
            first = next(stream).data
            proc.send_signal(signal.SIGTERM)

            deadline = time.monotonic() + 20
            refused = False
            while time.monotonic() < deadline and not refused:
                with grpc.insecure_channel(address) as fresh:
                    try:
                        merge_pb2_grpc.MergeServiceStub(fresh).Plan(
                            merge_pb2.MergeRequest(spec=spec), timeout=2
                        )
                        time.sleep(0.1)
                    except grpc.RpcError as e:
                        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # a busy machine: ask again
                            continue
                        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                        refused = True
            assert refused, "new calls were still accepted after SIGTERM"

            rest = [c for c in stream]
            got = first.data + b"".join(c.data.data for c in rest if c.WhichOneof("item") == "data")
            assert rest[-1].WhichOneof("item") == "trailer"
            assert got == data

        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = "".join(lines)
    assert '"draining"' in log and '"server stopped"' in log
    assert TOKEN_MARKER not in log
