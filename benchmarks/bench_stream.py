"""Merge-service streaming, side by side with a plain socket on the same machine.

1. Throughput of a cached 100+ MB merged adapter streamed by ``Merge`` over loopback (the server is a
   separate ``python -m merge_service`` process; the client is the generated Python stub), as a ratio
   to a plain TCP socket sending the same bytes between two processes. Both receivers write into a
   preallocated buffer they reuse, and the two kinds of transfer alternate so that both see the same
   machine load.
2. p50/p99 latency of a cached small ``Merge`` (the whole stream: header, data, trailer).

The big adapter is real: one LoRA of rank 64 on 56 modules of 4096×4096 (~117 MB in float32),
written locally and merged once by the service (linear, delta space: exact, no SVD); the timed
requests are cache hits.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from loramerge.v1 import merge_pb2, merge_pb2_grpc
from safetensors.torch import save_file

MiB = 1 << 20


@dataclass
class StreamResults:
    adapter_bytes: int
    chunk_bytes: int
    grpc_mb_s: float  # median of the repeats
    socket_mb_s: float
    ratio: float  # median of grpc / socket over back-to-back pairs
    grpc_runs_mb_s: list[float]
    socket_runs_mb_s: list[float]
    small_bytes: int
    small_calls: int
    small_p50_ms: float
    small_p99_ms: float
    small_mean_ms: float
    title: str = "bench_stream: Merge streaming vs a plain socket; cached small Merge latency"

    def markdown(self) -> str:
        from benchmarks.report import table

        mb = self.adapter_bytes / 1e6
        throughput = table(
            ("transfer of a cached adapter over loopback", "MB/s (median)", "runs MB/s"),
            [
                (f"gRPC Merge stream, {mb:.0f} MB in {self.chunk_bytes >> 10} KiB chunks",
                 self.grpc_mb_s, ", ".join(f"{r:.0f}" for r in self.grpc_runs_mb_s)),
                (f"plain TCP socket, same {mb:.0f} MB", self.socket_mb_s,
                 ", ".join(f"{r:.0f}" for r in self.socket_runs_mb_s)),
                ("ratio gRPC / socket (median of back-to-back pairs; aim ≥ 0.5)", self.ratio, ""),
            ],
        )  # fmt: skip
        latency = table(
            ("cached small Merge (whole stream)", "p50 ms", "p99 ms (aim < 20)", "mean ms"),
            [(f"{self.small_bytes} B adapter, {self.small_calls} calls", self.small_p50_ms, self.small_p99_ms,
              self.small_mean_ms)],
        )  # fmt: skip
        return throughput + "\n\n" + latency


def write_adapter(
    out: Path, *, rank: int, layers: int, modules: tuple[str, ...], dim: int, seed: int
) -> Path:
    """A PEFT LoRA adapter of random factors (config + safetensors), for a notional Llama of width dim."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for m in modules:
            parent = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            base = f"base_model.model.model.layers.{layer}.{parent}.{m}"
            tensors[f"{base}.lora_A.weight"] = torch.randn(rank, dim, generator=gen) / dim**0.5
            tensors[f"{base}.lora_B.weight"] = torch.randn(dim, rank, generator=gen) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": sorted(modules),
        "base_model_name_or_path": "bench/llama-like",
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


class ServiceProcess:
    """``python -m merge_service`` on a free loopback port, until close()."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "merge_service", *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        started = threading.Event()
        self.port = 0

        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                if '"server started"' in line:
                    self.port = json.loads(line)["port"]
                    started.set()

        threading.Thread(target=pump, daemon=True).start()
        if not started.wait(180):
            self.close()
            raise RuntimeError("merge service did not start:\n" + "".join(self.lines[-20:]))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def merge_once(
    stub: merge_pb2_grpc.MergeServiceStub, spec: merge_pb2.MergeSpec, out: bytearray | None = None
) -> tuple[bytearray, bool]:
    """One Merge call with the generated stub: the bytes placed at their offsets (in ``out`` when it
    has the right size, as the socket baseline reuses its buffer), and cache_hit."""
    buf, hit = bytearray(), False
    for chunk in stub.Merge(merge_pb2.MergeRequest(spec=spec), timeout=600):
        kind = chunk.WhichOneof("item")
        if kind == "data":
            piece = chunk.data.data
            buf[chunk.data.offset : chunk.data.offset + len(piece)] = piece
        elif kind == "header":
            hit = chunk.header.cache_hit
            size = chunk.header.total_bytes
            buf = out if out is not None and len(out) == size else bytearray(size)
    return buf, hit


_SOCKET_SERVER = r"""
import socket, sys
data = open(sys.argv[1], "rb").read()
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    conn.sendall(data)
    conn.close()
"""


class SocketSender:
    """Another process that sends the file's bytes to each loopback TCP connection: the baseline."""

    def __init__(self, path: Path) -> None:
        self.size = path.stat().st_size
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SOCKET_SERVER, str(path)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.buf = bytearray(self.size)

    def receive(self) -> float:
        """MB/s of one transfer, received into a preallocated buffer."""
        view = memoryview(self.buf)
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", self.port)) as s:
            got = 0
            while got < self.size:
                n = s.recv_into(view[got:], min(self.size - got, 4 * MiB))
                if n == 0:
                    raise RuntimeError("socket closed early")
                got += n
        return self.size / (time.perf_counter() - t0) / 1e6

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def measure(
    *, repeats: int = 5, small_calls: int = 300, chunk_bytes: int = MiB, workdir: Path | None = None
) -> StreamResults:
    """gRPC and socket transfers alternate, so both see the same load on a shared machine; the ratio
    is the median over those pairs."""
    with tempfile.TemporaryDirectory(prefix="bench-stream-", dir=workdir) as tmp:
        root = Path(tmp) / "adapters"
        modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        write_adapter(root / "big", rank=64, layers=8, modules=modules, dim=4096, seed=1)
        for name, seed in (("s1", 2), ("s2", 3)):
            write_adapter(root / name, rank=8, layers=2, modules=("q_proj", "v_proj"), dim=128, seed=seed)
        args = [
            "--listen", "127.0.0.1:0", "--metrics-port", "0", "--adapter-root", str(root),
            "--device", "cpu", "--cache-memory-bytes", "1GiB", "--chunk-bytes", str(chunk_bytes),
            "--max-send-message-bytes", str(chunk_bytes + MiB), "--log-level", "INFO",
            "--hub-cache-dir", str(Path(tmp) / "hub"), "--s3-cache-dir", str(Path(tmp) / "s3"),
        ]  # fmt: skip
        service = ServiceProcess(args)
        sender = None
        try:
            options = [("grpc.max_receive_message_length", chunk_bytes + 2 * MiB)]
            with grpc.insecure_channel(service.address, options=options) as channel:
                stub = merge_pb2_grpc.MergeServiceStub(channel)
                big = merge_pb2.MergeSpec(ids=["big"])
                data, _ = merge_once(stub, big)  # the build; everything after is a cache hit
                size = len(data)
                digest = hashlib.sha256(data).digest()
                blob = Path(tmp) / "merged.safetensors"
                blob.write_bytes(data)
                del data
                sender = SocketSender(blob)
                grpc_rates, sock_rates = [], []
                got = bytearray(size)
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    got, hit = merge_once(stub, big, got)
                    grpc_rates.append(size / (time.perf_counter() - t0) / 1e6)
                    assert hit and len(got) == size
                    sock_rates.append(sender.receive())
                assert hashlib.sha256(got).digest() == digest
                del got

                small = merge_pb2.MergeSpec(ids=["s1", "s2"], weights=[0.5, 0.5])
                small_data, _ = merge_once(stub, small)
                for _ in range(20):  # warm-up
                    merge_once(stub, small)
                latencies = []
                for _ in range(small_calls):
                    t0 = time.perf_counter()
                    _, hit = merge_once(stub, small)
                    latencies.append((time.perf_counter() - t0) * 1e3)
                    assert hit
        finally:
            service.close()
            if sender is not None:
                sender.close()

    return StreamResults(
        adapter_bytes=size,
        chunk_bytes=chunk_bytes,
        grpc_mb_s=statistics.median(grpc_rates),
        socket_mb_s=statistics.median(sock_rates),
        ratio=statistics.median(g / s for g, s in zip(grpc_rates, sock_rates, strict=True)),
        grpc_runs_mb_s=grpc_rates,
        socket_runs_mb_s=sock_rates,
        small_bytes=len(small_data),
        small_calls=small_calls,
        small_p50_ms=percentile(latencies, 0.5),
        small_p99_ms=percentile(latencies, 0.99),
        small_mean_ms=statistics.fmean(latencies),
    )


def run(report: Any) -> StreamResults:
    """Entry point for benchmarks/run.py."""
    r = measure()
    report(r)
    return r


def main() -> None:
    r = measure(repeats=int(os.environ.get("BENCH_REPEATS", "5")))
    print(json.dumps(asdict(r), indent=2))


if __name__ == "__main__":
    main()
