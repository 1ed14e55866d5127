"""Merge-service streaming, side by side with a plain socket on the same machine.

1. Throughput of a cached 100+ MB merged adapter streamed by ``Merge`` over loopback, as a ratio to a
   plain TCP socket sending the same bytes. The server is a separate ``python -m merge_service``
   process, the socket sender another process that ``sendall``s the file's bytes. Both are received by
   the same receiver process, which alternates the two kinds of transfer so that each gRPC run has a
   socket run next to it under the same machine load; a ratio is the median over those pairs.

   The receiver does the same work for both: every byte lands in one preallocated buffer at its
   offset (the socket with ``recv_into``, gRPC by copying each data chunk's payload there). Rows
   without sha256 compare the transports; rows with it hash incrementally on both sides, as the real
   receivers do before they accept an adapter. gRPC is received four ways: the generated stub
   (protobuf parses each chunk and ``chunk.data.data`` copies it), ``merge_method`` (data chunks as
   views into the received message, clients/loramerge/stream.py; what the inference service uses),
   ``merge_method`` with sha256, and the client library's ``MergeClient.merge`` (verified; paired with
   the hashing socket run, though it does more: it returns the adapter as one new ``bytes`` each time,
   whose pages fault in afresh, where the others reuse one buffer).

   Two receiver processes run side by side, round by round: one with glibc's allocator defaults, one
   that keeps freed heap for the next message (``keep_freed_heap``, as the inference service does).
   Besides wall-clock throughput, each row gives the CPU time of both ends per GB and the receiver's
   page faults: on a shared machine the CPU cost is the steadier number, and an end's CPU cost bounds
   what it can do with a core to itself ("CPU-bound ratio": socket's busier end / gRPC's busier end).
2. p50/p99 latency of a cached small ``Merge`` (the whole stream: header, data, trailer), generated stub.

The big adapter is real: one LoRA of rank 64 on 56 modules of 4096×4096 (~117 MB in float32),
written locally and merged once by the service (linear, delta space: exact, no SVD); the timed
requests are cache hits.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from loramerge.peft import CONFIG_FILE, WEIGHTS_FILE
from loramerge.v1 import merge_pb2, merge_pb2_grpc

MiB = 1 << 20
# Receive order within a round; each gRPC variant is paired with a socket run of the same round.
ROUND = ("view", "socket", "view+sha256", "socket+sha256", "client", "inference", "stub")
PAIRS = {
    "view": "socket",
    "view+sha256": "socket+sha256",
    "client": "socket+sha256",
    "inference": "socket+sha256",
    "stub": "socket",
}
LABELS = {
    "stub": "gRPC Merge, generated stub (protobuf parse + copy)",
    "view": "gRPC Merge, merge_method (payload views)",
    "view+sha256": "gRPC Merge, merge_method + sha256",
    "client": "loramerge_client MergeClient.merge (sha256, bytes result)",
    "inference": "inference service's receiver (asyncio, sha256, PEFT folder on disk)",
    "socket": "plain TCP socket",
    "socket+sha256": "plain TCP socket + sha256",
}
RECEIVERS = {"default": "glibc defaults", "kept": "freed heap kept (keep_freed_heap)"}


@dataclass
class Row:
    receiver: str  # a RECEIVERS key
    variant: str  # a LABELS key
    mb_s: float  # median wall-clock throughput
    runs_mb_s: list[float]
    ratio: float | None  # median over rounds of this / its socket pair (None for socket rows)
    cpu_ratio: float | None  # socket's busier end / this one's busier end, CPU s/GB medians
    recv_cpu_s_gb: float
    send_cpu_s_gb: float
    recv_faults_per_mb: float


@dataclass
class StreamResults:
    adapter_bytes: int
    chunk_bytes: int
    repeats: int
    rows: list[Row]
    small_bytes: int
    small_calls: int
    small_p50_ms: float
    small_p99_ms: float
    small_mean_ms: float
    headline: dict[str, float] = field(default_factory=dict)
    title: str = "bench_stream: Merge streaming vs a plain socket; cached small Merge latency"

    def markdown(self) -> str:
        from benchmarks.report import table

        def opt(v: float | None) -> str | float:
            return "" if v is None else v

        mb = self.adapter_bytes / 1e6
        throughput = table(
            ("receiver", "transfer", "MB/s median", "runs MB/s", "ratio to socket (aim ≥ 0.5)",
             "CPU-bound ratio", "recv CPU s/GB", "send CPU s/GB", "recv page faults/MB"),
            [(RECEIVERS[r.receiver], LABELS[r.variant], r.mb_s, ", ".join(f"{x:.0f}" for x in r.runs_mb_s),
              opt(r.ratio), opt(r.cpu_ratio), r.recv_cpu_s_gb, r.send_cpu_s_gb, r.recv_faults_per_mb)
             for r in self.rows],
        )  # fmt: skip
        latency = table(
            ("cached small Merge (whole stream)", "p50 ms", "p99 ms (aim < 20)", "mean ms"),
            [(f"{self.small_bytes} B adapter, {self.small_calls} calls", self.small_p50_ms, self.small_p99_ms,
              self.small_mean_ms)],
        )  # fmt: skip
        intro = (
            f"A cached {mb:.0f} MB adapter in {self.chunk_bytes >> 10} KiB chunks over loopback, "
            f"{self.repeats} rounds; each gRPC run is paired with the socket run next to it. "
            "Both receive into a preallocated buffer (the client library row excepted: it returns a new "
            "bytes each call); the sha256 rows hash on both sides. CPU: user+system time of the receiving "
            "and the sending process per GB; CPU-bound ratio: socket's busier end over gRPC's busier end, "
            "the ratio to expect with a core for each end."
        )
        return intro + "\n\n" + throughput + "\n\n" + latency


# (out, in) of each projection in Llama-3-8B: hidden 4096, intermediate 14336, 8 KV heads of 128.
LLAMA3_8B = {
    "q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336),
}  # fmt: skip


def write_adapter(
    out: Path,
    *,
    rank: int,
    layers: int,
    modules: tuple[str, ...],
    dim: int,
    seed: int,
    shapes: dict[str, tuple[int, int]] | None = None,
) -> Path:
    """A PEFT LoRA adapter of random factors (config + safetensors): projections dim × dim, or of
    ``shapes`` (module → (out, in)) when given."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for m in modules:
            n_out, n_in = (shapes or {}).get(m, (dim, dim))
            parent = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            base = f"base_model.model.model.layers.{layer}.{parent}.{m}"
            tensors[f"{base}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen) / n_in**0.5
            tensors[f"{base}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": sorted(modules),
        "base_model_name_or_path": "bench/llama-like",
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    (out / CONFIG_FILE).write_text(json.dumps(config))
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
    has the right size), and cache_hit."""
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
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SOCKET_SERVER, str(path)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


# --- the receiver process -------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` so far (nanosecond schedstat, not clock ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, IndexError, ValueError):  # a thread that ended meanwhile
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total / 1e9


def minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def _receivers(job: dict[str, Any]) -> dict[str, Callable[[bytearray], bytes | None]]:
    """One function per variant: receive the adapter into ``out``; the sha256 digest where hashed."""
    from loramerge.stream import DataView, merge_method
    from loramerge_client import MergeClient

    options = [("grpc.max_receive_message_length", 64 * MiB)]
    channel = grpc.insecure_channel(job["address"], options=options)
    stub = merge_pb2_grpc.MergeServiceStub(channel)
    merge = merge_method(channel)
    request = merge_pb2.MergeRequest(spec=merge_pb2.MergeSpec(ids=[job["adapter"]]))
    size, port = job["size"], job["socket_port"]

    def stub_recv(out: bytearray) -> None:
        view = memoryview(out)
        for chunk in stub.Merge(request, timeout=600):
            if chunk.WhichOneof("item") == "data":
                piece = chunk.data.data
                view[chunk.data.offset : chunk.data.offset + len(piece)] = piece

    def view_recv(out: bytearray, hashed: bool) -> bytes | None:
        view = memoryview(out)
        digest = hashlib.sha256() if hashed else None
        for item in merge(request, timeout=600):
            if isinstance(item, DataView):
                view[item.offset : item.offset + len(item.data)] = item.data
                if digest is not None:
                    digest.update(item.data)
        return digest.digest() if digest is not None else None

    def socket_recv(out: bytearray, hashed: bool) -> bytes | None:
        view = memoryview(out)
        digest = hashlib.sha256() if hashed else None
        with socket.create_connection(("127.0.0.1", port)) as s:
            got = 0
            while got < size:
                n = s.recv_into(view[got:], min(size - got, 4 * MiB))
                if n == 0:
                    raise RuntimeError("socket closed early")
                if digest is not None:
                    digest.update(view[got : got + n])
                got += n
        return digest.digest() if digest is not None else None

    client = MergeClient(channel=channel, timeout=600)
    scratch = Path(job["scratch"])

    def inference_recv(out: bytearray) -> bytes:
        """What the inference service runs for a fetch: asyncio channel, the contract's receiver into a
        PEFT folder (header policy, sha256, file on disk); the folder is removed afterwards."""
        import asyncio

        from inference_service.receiver import AdapterLimits, AdapterWriter, receive

        async def fetch() -> bytes:
            async with grpc.aio.insecure_channel(job["address"], options=options) as aio_channel:
                writer = AdapterWriter(
                    scratch / f"fetched-{os.getpid()}", AdapterLimits("bench/llama-like", 1024, 1 << 40)
                )
                try:
                    received = await receive(merge_method(aio_channel)(request, timeout=600), writer)
                finally:
                    writer.discard()
                return bytes.fromhex(received.header.sha256) if received.bytes == size else b""

        return asyncio.run(fetch())

    def client_recv(out: bytearray) -> bytes:
        """The library verifies size and sha256 itself; its result is a new ``bytes``, not ``out``."""
        result = client.merge(request.spec)
        return bytes.fromhex(result.sha256) if len(result.data) == size else b""

    return {
        "client": client_recv,
        "inference": inference_recv,
        "stub": stub_recv,
        "view": lambda out: view_recv(out, False),
        "view+sha256": lambda out: view_recv(out, True),
        "socket": lambda out: socket_recv(out, False),
        "socket+sha256": lambda out: socket_recv(out, True),
    }


def receiver_main(job: dict[str, Any]) -> None:
    """Run rounds on request: one line on stdin → one round of ROUND, one JSON line on stdout."""
    if job["keep_heap"]:
        from inference_service.merge_client import keep_freed_heap

        if not keep_freed_heap():
            raise RuntimeError("mallopt is not available here")
    receive = _receivers(job)
    out = bytearray(job["size"])
    me = os.getpid()
    expected = bytes.fromhex(job["sha256"])
    for _ in sys.stdin:
        results = {}
        for variant in ROUND:
            peer = job["sender_pid"] if variant.startswith("socket") else job["server_pid"]
            c0, p0, f0 = time.process_time(), process_cpu_seconds(peer), minor_faults(me)
            t0 = time.perf_counter()
            digest = receive[variant](out)
            dt = time.perf_counter() - t0
            c1, p1, f1 = time.process_time(), process_cpu_seconds(peer), minor_faults(me)
            if digest is not None and digest != expected:
                raise RuntimeError(f"{variant}: sha256 mismatch")
            results[variant] = {"seconds": dt, "recv_cpu": c1 - c0, "send_cpu": p1 - p0, "faults": f1 - f0}
        if hashlib.sha256(out).digest() != expected:
            raise RuntimeError("received bytes differ from the adapter")
        print(json.dumps(results), flush=True)


class Receiver:
    """A receiver process (``receiver_main``), driven one round at a time."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_stream", "--receiver", json.dumps(job)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )

    def round(self) -> dict[str, dict[str, float]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"receiver process failed (exit {self.proc.wait(30)})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(receiver: str, rounds: list[dict[str, dict[str, float]]], size: int) -> list[Row]:
    med = statistics.median
    cpu = {
        v: (
            med(r[v]["recv_cpu"] for r in rounds) * 1e9 / size,
            med(r[v]["send_cpu"] for r in rounds) * 1e9 / size,
        )
        for v in ROUND
    }
    rows = []
    for v in sorted(ROUND, key=list(LABELS).index):
        rates = [size / r[v]["seconds"] / 1e6 for r in rounds]
        pair = PAIRS.get(v)
        rows.append(
            Row(
                receiver=receiver,
                variant=v,
                mb_s=med(rates),
                runs_mb_s=rates,
                ratio=med(r[pair]["seconds"] / r[v]["seconds"] for r in rounds) if pair else None,
                cpu_ratio=max(cpu[pair]) / max(cpu[v]) if pair else None,
                recv_cpu_s_gb=cpu[v][0],
                send_cpu_s_gb=cpu[v][1],
                recv_faults_per_mb=med(r[v]["faults"] for r in rounds) * 1e6 / size,
            )
        )
    return rows


def measure(
    *, repeats: int = 7, small_calls: int = 300, chunk_bytes: int | None = None, workdir: Path | None = None
) -> StreamResults:
    """See the module docstring. ``chunk_bytes`` None: the merge service's default."""
    with tempfile.TemporaryDirectory(prefix="bench-stream-", dir=workdir) as tmp:
        root = Path(tmp) / "adapters"
        modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        # A merged adapter of Llama-3-8B's size: rank 16 on all seven projections of 32 layers, float32.
        write_adapter(root / "big", rank=16, layers=32, modules=modules, dim=4096, seed=1, shapes=LLAMA3_8B)
        for name, seed in (("s1", 2), ("s2", 3)):
            write_adapter(root / name, rank=8, layers=2, modules=("q_proj", "v_proj"), dim=128, seed=seed)
        args = [
            "--listen", "127.0.0.1:0", "--metrics-port", "0", "--adapter-root", str(root),
            "--device", "cpu", "--cache-memory-bytes", "1GiB", "--log-level", "INFO",
            "--hub-cache-dir", str(Path(tmp) / "hub"), "--s3-cache-dir", str(Path(tmp) / "s3"),
        ]  # fmt: skip
        if chunk_bytes is not None:
            args += ["--chunk-bytes", str(chunk_bytes), "--max-send-message-bytes", str(chunk_bytes + MiB)]
        service = ServiceProcess(args)
        sender: SocketSender | None = None
        receivers: dict[str, Receiver] = {}
        try:
            options = [("grpc.max_receive_message_length", 64 * MiB)]
            with grpc.insecure_channel(service.address, options=options) as channel:
                stub = merge_pb2_grpc.MergeServiceStub(channel)
                big = merge_pb2.MergeSpec(ids=["big"])
                chunk_seen = 0
                for chunk in stub.Merge(merge_pb2.MergeRequest(spec=big), timeout=600):  # the build
                    chunk_seen = max(chunk_seen, len(chunk.data.data))
                data, hit = merge_once(stub, big)
                assert hit
                size = len(data)
                blob = Path(tmp) / "merged.safetensors"
                blob.write_bytes(data)
                digest = hashlib.sha256(data).hexdigest()
                del data
                sender = SocketSender(blob)
                job = {
                    "address": service.address, "adapter": "big", "size": size, "sha256": digest,
                    "socket_port": sender.port, "server_pid": service.proc.pid, "sender_pid": sender.proc.pid,
                    "scratch": tmp,
                }  # fmt: skip
                receivers = {name: Receiver({**job, "keep_heap": name == "kept"}) for name in RECEIVERS}
                for r in receivers.values():  # warm-up round: connections, caches, allocator
                    r.round()
                rounds: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name in receivers}
                for _ in range(repeats):
                    for name, r in receivers.items():
                        rounds[name].append(r.round())
                for r in receivers.values():
                    r.close()
                receivers = {}

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
            for r in receivers.values():
                r.proc.kill()
            service.close()
            if sender is not None:
                sender.close()

    rows = [row for name in RECEIVERS for row in summarize(name, rounds[name], size)]
    headline = {f"{r.receiver}/{r.variant}": r.ratio for r in rows if r.ratio is not None}
    return StreamResults(
        adapter_bytes=size,
        chunk_bytes=chunk_seen,
        repeats=repeats,
        rows=rows,
        small_bytes=len(small_data),
        small_calls=small_calls,
        small_p50_ms=percentile(latencies, 0.5),
        small_p99_ms=percentile(latencies, 0.99),
        small_mean_ms=statistics.fmean(latencies),
        headline=headline,
    )


def run(report: Any) -> StreamResults:
    """Entry point for benchmarks/run.py."""
    r = measure()
    report(r)
    return r


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--receiver":
        receiver_main(json.loads(sys.argv[2]))
        return
    r = measure(repeats=int(os.environ.get("BENCH_REPEATS", "7")))
    print(json.dumps(asdict(r), indent=2))


if __name__ == "__main__":
    main()
