"""Sustained load on the real stack: many concurrent clients, several merged specs and the base model.

    python -m benchmarks.load --seconds 90               # `make load`: result appended to BENCHMARKS.md
    python -m benchmarks.load --seconds 20 --no-write    # a quick look

Starts the merge service and the inference service (vLLM on a tiny local Llama) as processes with
the hardened settings of tests/faults/stack.py (TLS, mutual TLS between them, bearer tokens; ``--plain``
turns TLS and tokens off), then keeps ``--clients`` concurrent callers busy for ``--seconds``: each
request is a short greedy ``Generate`` on the base model (``--base-fraction`` of them) or on one of
``--specs`` merged specs, more than the inference service keeps loaded, so adapters are evicted and
fetched again all the time. It reports requests served, errors by code, how many times the merge
service built each spec (read from its metrics and its log; the aim is exactly once each), latency
percentiles by kind, the peak memory (RSS) of each service's process tree, and the number of files
in the inference service's adapter directory (peak and final: eviction keeps it bounded).

``run_load(stack, LoadConfig(...))`` is what the CI test (tests/load/) calls on its own stack.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

from inference_service.request_specs import normalize_spec
from loramerge.v1 import inference_pb2, inference_pb2_grpc, merge_pb2
from tests.faults.stack import MAX_LOADED_ADAPTERS, MAX_LORA_RANK, Stack

I = inference_pb2  # noqa: E741
M = merge_pb2
PROMPTS = [
    "The quick brown fox",
    "Once upon a time, there was",
    "A merged adapter is served",
    "0123456789",
    "Low-rank adaptation adds",
]


@dataclass(frozen=True)
class LoadConfig:
    seconds: float = 90.0
    clients: int = 12
    specs: int = MAX_LOADED_ADAPTERS + 4  # more than stay loaded, and more than vLLM's LoRA slots
    base_fraction: float = 0.3
    max_tokens: int = 8
    timeout: float = 120.0
    seed: int = 0


def load_specs(n: int) -> list[M.MergeSpec]:
    """``n`` distinct merges of the test adapters: linear pairs and TIES triples at distinct weights."""
    pairs = [("a", "b"), ("a", "e"), ("b", "e"), ("c", "e"), ("a", "c"), ("b", "c")]
    out = []
    for i in range(n):
        w = round(0.15 + 0.07 * (i // len(pairs)) + 0.01 * i, 2)
        if i % 3 == 2:
            ids = (*pairs[i % len(pairs)], "e" if "e" not in pairs[i % len(pairs)] else "a")
            refs = [M.AdapterRef(id=x, weight=v) for x, v in zip(ids, (w, 1 - w, 0.5), strict=True)]
            out.append(M.MergeSpec(adapters=refs, merge_strategy=M.TIES, density=0.6))
        else:
            x, y = pairs[i % len(pairs)]
            out.append(M.MergeSpec(adapters=[M.AdapterRef(id=x, weight=w), M.AdapterRef(id=y, weight=1 - w)]))
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class LoadResult:
    title = "Sustained load (merge service + inference service, CPU)"
    config: LoadConfig
    tls: bool
    seconds: float = 0.0
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, list[float]] = field(default_factory=dict)  # by kind
    distinct_specs: int = 0
    builds_total: int = 0  # loramerge_merge_builds_total during the run
    builds_per_spec: dict[str, int] = field(default_factory=dict)  # merge key -> builds (merge log)
    merge_fetches: int = 0  # Merge calls the inference service made during the run
    evictions: int = 0
    max_loaded: int = 0
    peak_rss_merge_mib: float = 0.0
    peak_rss_inference_mib: float = 0.0
    adapter_files_peak: int = 0
    adapter_files_final: int = 0
    adapters_loaded_final: int = 0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def all_latencies(self) -> list[float]:
        return [v for values in self.latency_ms.values() for v in values]

    def markdown(self) -> str:
        c = self.config
        lines = [
            f"{c.clients} concurrent clients for {self.seconds:.0f} s; {c.specs} distinct merged specs "
            f"(the inference service keeps {self.max_loaded} loaded) and {c.base_fraction:.0%} base-model "
            f"requests; greedy, {c.max_tokens} tokens each; TLS and tokens {'on' if self.tls else 'off'}.",
            "",
            "| measure | value |",
            "|---|---|",
            f"| requests served | {self.requests} ({self.requests / max(self.seconds, 1e-9):.1f}/s) |",
            f"| errors | {self.error_count} {dict(self.errors) or ''} |",
            f"| merge builds (metric) / distinct specs | {self.builds_total} / {self.distinct_specs} |",
            f"| builds per spec (merge log) | {sorted(self.builds_per_spec.values())} |",
            f"| adapter fetches from the merge service | {self.merge_fetches} |",
            f"| adapter evictions (LRU) | {self.evictions} |",
            f"| peak RSS, merge service | {self.peak_rss_merge_mib:.0f} MiB |",
            f"| peak RSS, inference service (process tree) | {self.peak_rss_inference_mib:.0f} MiB |",
            f"| adapter dir files: peak / final (loaded at end) | {self.adapter_files_peak} / "
            f"{self.adapter_files_final} ({self.adapters_loaded_final}) |",
            "",
            "| latency (ms) | requests | p50 | p99 | max |",
            "|---|---|---|---|---|",
        ]
        for kind, values in [("all", self.all_latencies()), *sorted(self.latency_ms.items())]:
            lines.append(
                f"| {kind} | {len(values)} | {percentile(values, 50):.0f} | {percentile(values, 99):.0f} "
                f"| {max(values, default=float('nan')):.0f} |"
            )
        return "\n".join(lines)


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def count_files(directory: Path) -> int:
    """Files under ``directory``; folders removed while it is walked are skipped (os.walk ignores
    their errors, where Path.rglob raises and would end the sampler thread)."""
    return sum(len(files) for _, _, files in os.walk(directory))


class Sampler(threading.Thread):
    """Peak RSS of both services and peak file count of the adapter directory, every ``interval`` s."""

    def __init__(self, stack: Stack, interval: float = 0.25) -> None:
        super().__init__(name="load-sampler", daemon=True)
        self.stack, self.interval = stack, interval
        self.peak_merge = self.peak_inference = self.peak_files = 0
        self._halt = threading.Event()

    def sample(self) -> None:
        s = self.stack
        assert s.merge.proc is not None and s.inference.proc is not None
        self.peak_merge = max(self.peak_merge, tree_rss(s.merge.proc.pid))
        self.peak_inference = max(self.peak_inference, tree_rss(s.inference.proc.pid))
        self.peak_files = max(self.peak_files, count_files(s.adapter_dir))

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self.sample()


def _aio_channel(stack: Stack) -> grpc.aio.Channel:
    if not stack.tls:
        return grpc.aio.insecure_channel(stack.inference.address)
    assert stack.pki is not None
    creds = grpc.ssl_channel_credentials(root_certificates=stack.pki.ca_crt.read_bytes())
    return grpc.aio.secure_channel(stack.inference.address, creds)


async def _drive(
    stack: Stack, cfg: LoadConfig, specs: list[M.MergeSpec], result: LoadResult
) -> collections.Counter[str]:
    codes: collections.Counter[str] = collections.Counter()
    async with _aio_channel(stack) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        deadline = time.monotonic() + cfg.seconds

        async def client(n: int) -> None:
            rng = random.Random(cfg.seed * 1000 + n)
            while time.monotonic() < deadline:
                request = I.GenerateRequest(
                    prompt=rng.choice(PROMPTS), sampling=I.SamplingParams(max_tokens=cfg.max_tokens)
                )
                kind = "base"
                if rng.random() >= cfg.base_fraction:
                    request.merged_adapters.CopyFrom(rng.choice(specs))
                t0 = time.perf_counter()
                try:
                    reply = await stub.Generate(
                        request, metadata=stack.inference_metadata, timeout=cfg.timeout
                    )
                except grpc.aio.AioRpcError as e:
                    codes[e.code().name] += 1
                    continue
                if request.HasField("merged_adapters"):
                    kind = "merged, loaded" if reply.adapter.already_loaded else "merged, fetched"
                result.latency_ms.setdefault(kind, []).append((time.perf_counter() - t0) * 1e3)
                codes["OK"] += 1

        await asyncio.gather(*(client(n) for n in range(cfg.clients)))
    return codes


def _forget(stack: Stack, specs: list[M.MergeSpec]) -> list[str]:
    """Evict the specs' merges from the merge cache and unload them, so each must be built once."""
    merge, inference = stack.merge_stub(), stack.inference_stub()
    keys = []
    for spec in specs:
        request = M.MergeRequest(spec=normalize_spec(spec, MAX_LORA_RANK))
        key = merge.Plan(request, metadata=stack.merge_metadata, timeout=60).merge_key
        merge.Evict(M.EvictRequest(merge_key=key), metadata=stack.merge_admin_metadata, timeout=60)
        inference.UnloadAdapter(
            I.UnloadAdapterRequest(merge_key=key), metadata=stack.inference_admin_metadata, timeout=60
        )
        keys.append(key)
    return keys


def run_load(stack: Stack, cfg: LoadConfig) -> LoadResult:
    specs = load_specs(cfg.specs)
    keys = _forget(stack, specs)
    result = LoadResult(config=cfg, tls=stack.tls, distinct_specs=len(set(keys)))
    builds0 = stack.merge.metric("loramerge_merge_builds_total")
    fetches0 = stack.merge.metric("loramerge_rpc_requests_total", {"method": "Merge"})
    evictions0 = stack.inference.metric("loramerge_inference_adapter_evictions_total", {"reason": "lru"})
    built_before = collections.Counter(e["merge_key"] for e in stack.log_events(stack.merge, "merge built"))

    sampler = Sampler(stack)
    sampler.sample()
    sampler.start()
    t0 = time.monotonic()
    try:
        codes = asyncio.run(_drive(stack, cfg, specs, result))
    finally:
        result.seconds = time.monotonic() - t0
        sampler.stop()

    result.requests = codes.pop("OK", 0)
    result.errors = dict(codes)
    result.builds_total = round(stack.merge.metric("loramerge_merge_builds_total") - builds0)
    result.merge_fetches = round(
        stack.merge.metric("loramerge_rpc_requests_total", {"method": "Merge"}) - fetches0
    )
    result.evictions = round(
        stack.inference.metric("loramerge_inference_adapter_evictions_total", {"reason": "lru"}) - evictions0
    )
    built = collections.Counter(e["merge_key"] for e in stack.log_events(stack.merge, "merge built"))
    result.builds_per_spec = {k: built[k] - built_before[k] for k in keys}
    listed = stack.inference_stub().ListAdapters(
        I.ListAdaptersRequest(), metadata=stack.inference_metadata, timeout=60
    )
    result.max_loaded = listed.max_loaded
    result.adapters_loaded_final = len(listed.adapters)
    result.peak_rss_merge_mib = sampler.peak_merge / 2**20
    result.peak_rss_inference_mib = sampler.peak_inference / 2**20
    result.adapter_files_peak = sampler.peak_files
    result.adapter_files_final = count_files(stack.adapter_dir)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.splitlines()[0])
    defaults = LoadConfig()
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--specs", type=int, default=defaults.specs)
    parser.add_argument("--base-fraction", type=float, default=defaults.base_fraction)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--plain", action="store_true", help="no TLS, no tokens")
    parser.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    cfg = LoadConfig(
        seconds=args.seconds,
        clients=args.clients,
        specs=args.specs,
        base_fraction=args.base_fraction,
        max_tokens=args.max_tokens,
    )

    from benchmarks.report import Report
    from tests.factories import make_adapter, make_tiny_llama
    from tests.faults.stack import default_limits

    report = Report()
    with tempfile.TemporaryDirectory(prefix="loramerge-load-") as tmp:
        root = Path(tmp)
        model = make_tiny_llama(root / "tiny-llama")
        adapters = root / "adapters"
        for name, r, alpha, seed, rslora in (
            ("a", 8, 16, 1, False),
            ("b", 4, 8, 2, False),
            ("c", 8, 16, 3, True),
            ("e", 8, 32, 5, False),
        ):
            make_adapter(adapters / name, model, r=r, alpha=alpha, seed=seed, use_rslora=rslora)
        print("starting the services ...", flush=True)
        stack = Stack.start(
            root / "stack",
            model,
            adapters,
            tls=not args.plain,
            auth=not args.plain,
            limits=default_limits(adapters),
        )
        try:
            print(f"running {cfg.clients} clients for {cfg.seconds:.0f} s ...", flush=True)
            result = run_load(stack, cfg)
        finally:
            stack.close()
    report(result)
    if not args.no_write:
        report.append_to()
        print("appended to BENCHMARKS.md")
    healthy = result.error_count == 0 and all(n == 1 for n in result.builds_per_spec.values())
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
