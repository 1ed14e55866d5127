"""Merges at real-model scale: ``Merger.build`` from files to bytes at Llama-3-8B shapes, beside floors.

Four synthetic rank-16 adapters (bfloat16 safetensors, lora_alpha 32) on all seven projections of
``BENCH_SCALE_LAYERS`` (default 32) Llama-3-8B layers: hidden 4096, intermediate 14336, 8 KV heads of
dim 128 (k/v out 1024). Each factor pair has a decaying spectrum (B's columns scaled by 0.85^j), as
trained adapters do. Weights 1.0, 0.8, 0.6, 0.5, density 0.5.

Each strategy is built in its own subprocess (``--child``), so its peak RSS (VmHWM) is its own (not
ru_maxrss: Linux carries that across fork and exec, so a child of a large parent reports the parent's);
the time is ``Merger.build`` (load the files, merge, serialize, sha256). Floors measured in the same run:
- read: reading the four input files once (warm page cache), plus writing the output bytes once;
- compute: the FLOPs a dense strategy cannot avoid — forming every ΔW_i once (2·r per entry per adapter)
  and one sketch product of the merged matrix (2·(k+p) per entry, k+p = 26) — at the large float32
  matmul rate (4096³) measured in the same run with the same threads.
Reconstruction error ‖M − BA‖/‖M‖ against the exact dense merge M on a few sampled modules, beside
the truncated-SVD optimum for that M (from its singular values).

    python -m benchmarks.bench_scale                       # 32 layers, CPU
    BENCH_SCALE_LAYERS=8 python -m benchmarks.bench_scale  # fewer layers
    python -m benchmarks.bench_scale --device cuda         # on a GPU
    python -m benchmarks.bench_scale --tiny --layers 2     # tiny shapes (CI smoke test)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import table
from loramerge.peft import CONFIG_FILE, WEIGHTS_FILE

NAMES = ("a0", "a1", "a2", "a3")
WEIGHTS = (1.0, 0.8, 0.6, 0.5)
RANK = 16
ALPHA = 32
DENSITY = 0.5
TARGET = 16
SKETCH = 26  # k + p counted by the compute floor
STRATEGIES: tuple[tuple[str, str, int], ...] = (
    # (label, strategy, target rank: 0 = exact)
    ("linear exact", "linear", 0),
    ("linear → r16", "linear", TARGET),
    ("ties → r16", "ties", TARGET),
    ("dare_ties → r16", "dare_ties", TARGET),
    ("magnitude_prune → r16", "magnitude_prune", TARGET),
)


@dataclass(frozen=True)
class Shapes:
    hidden: int = 4096
    intermediate: int = 14336
    kv: int = 1024

    def projections(self) -> dict[str, tuple[str, int, int]]:
        """{projection: (parent, d_out, d_in)}."""
        h, i, kv = self.hidden, self.intermediate, self.kv
        return {
            "q_proj": ("self_attn", h, h),
            "k_proj": ("self_attn", kv, h),
            "v_proj": ("self_attn", kv, h),
            "o_proj": ("self_attn", h, h),
            "gate_proj": ("mlp", i, h),
            "up_proj": ("mlp", i, h),
            "down_proj": ("mlp", h, i),
        }


LLAMA3_8B = Shapes()
TINY = Shapes(hidden=256, intermediate=512, kv=64)


def module_names(layers: int, shapes: Shapes) -> list[tuple[str, int, int]]:
    return [
        (f"model.layers.{layer}.{parent}.{proj}", d_out, d_in)
        for layer in range(layers)
        for proj, (parent, d_out, d_in) in shapes.projections().items()
    ]


def write_adapters(root: Path, layers: int, shapes: Shapes, seed: int = 0) -> int:
    """Four PEFT adapter folders a0..a3 under ``root``; returns their total file bytes."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    decay = 0.85 ** torch.arange(RANK, dtype=torch.float32)
    total = 0
    for name in NAMES:
        tensors: dict[str, torch.Tensor] = {}
        for module, d_out, d_in in module_names(layers, shapes):
            a = torch.randn(RANK, d_in, generator=gen) / math.sqrt(d_in)
            b = torch.randn(d_out, RANK, generator=gen) * decay * 0.02
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
        folder = root / name
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / WEIGHTS_FILE))
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B",
            "r": RANK,
            "lora_alpha": ALPHA,
            "target_modules": sorted(shapes.projections()),
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "lora_dropout": 0.0,
        }
        (folder / CONFIG_FILE).write_text(json.dumps(config))
        total += sum(p.stat().st_size for p in folder.iterdir())
    return total


def read_floor(root: Path) -> float:
    """Seconds to read every input file once (best of 2, page cache warm)."""
    files = sorted(root.rglob("*.safetensors"))
    best = math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(16 << 20):
                    pass
        best = min(best, time.perf_counter() - t0)
    return best


def write_rate(root: Path, nbytes: int = 128 << 20) -> float:
    """Bytes per second writing one buffer to a file in ``root`` (best of 2)."""
    buf = os.urandom(1 << 20) * (nbytes >> 20)
    best = math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        with open(root / "write-floor.bin", "wb") as f:
            f.write(buf)
        best = min(best, time.perf_counter() - t0)
    (root / "write-floor.bin").unlink()
    return nbytes / best


def matmul_rate(device: str, n: int = 4096) -> float:
    """FLOP/s of one large float32 matmul (best of 3) on ``device``."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = math.inf
    for _ in range(3):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def compute_flops(layers: int, shapes: Shapes, n_adapters: int = len(NAMES)) -> float:
    """FLOPs a dense merge cannot avoid: Σ_modules d_out·d_in·(2·r·n + 2·(k+p))."""
    entries = sum(d_out * d_in for _, d_out, d_in in module_names(layers, shapes))
    return entries * (2.0 * RANK * n_adapters + 2.0 * SKETCH)


# ------------------------------------------------------------------------------------------ child


def _spec(strategy: str, target: int) -> Any:
    from merge_service.spec import AdapterRef, MergeSpec, Strategy

    kw: dict[str, Any] = {}
    if strategy != "linear":
        kw["density"] = DENSITY
    if strategy.startswith("dare"):
        kw["seed"] = 7
    return MergeSpec(
        adapters=tuple(AdapterRef(n, weight=w) for n, w in zip(NAMES, WEIGHTS, strict=True)),
        strategy=Strategy(strategy),
        target_rank=target,
        **kw,
    )


def sampled_modules(layers: int, shapes: Shapes) -> list[str]:
    """A few modules for the error check: q, k and o of the last layer (full SVDs stay affordable)."""
    last = layers - 1
    return [f"model.layers.{last}.self_attn.{p}" for p in ("q_proj", "k_proj", "o_proj")]


def module_errors(plan: Any, built: Any, device: str, modules: list[str]) -> list[tuple[float, float]]:
    """(ours, optimum) relative errors on ``modules``: ours = ‖M − BA‖/‖M‖ from the output bytes, the
    optimum = the rank-k truncated SVD of the exact dense merge M (from its singular values)."""
    from safetensors.torch import load as load_bytes

    from merge_service import strategies
    from merge_service.adapter import LoraModule, load_adapter
    from merge_service.factorize import relative_tail
    from merge_service.module_merge import delta_dense
    from merge_service.output import tensor_names
    from merge_service.pipeline import _adapter_keys
    from merge_service.strategies import MergeParams, tensor_seed

    spec = plan.spec
    order = plan.order
    adapters = [load_adapter(plan.sources[i], "cpu") for i in order]
    weights = [spec.adapters[i].weight for i in order]
    keys = _adapter_keys([plan.sources[i].digest for i in order])
    strategy = strategies.get(spec.strategy)
    params = MergeParams(density=spec.density or 1.0, sign_method=spec.sign_method, seed=spec.seed or 0)
    out = load_bytes(built.data)
    found = []
    for m in modules:
        parts = [LoraModule(a.modules[m].A, a.modules[m].B, a.modules[m].scale) for a in adapters]
        dense = [delta_dense(p) for p in parts]
        seeds = [tensor_seed(params.seed, m, k, "delta") for k in keys]
        merged = strategy.fn(dense, weights, params, seeds).double()
        name_a, name_b = tensor_names(m)
        approx = out[name_b].double() @ out[name_a].double()
        norm = float(merged.norm())
        ours = float((merged - approx).norm()) / norm if norm > 0 else 0.0
        s = torch.linalg.svdvals(merged.float().to(device))  # float32: ample for a tail ratio
        found.append((ours, relative_tail(s, plan.rank)))
    return found


def peak_rss(pid: int) -> int:
    """Peak resident bytes of process ``pid`` since it started its program (VmHWM)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM"))


def child(args: argparse.Namespace) -> None:
    """Build one strategy; print one JSON line: seconds, peak RSS, output bytes, errors."""
    torch.set_num_threads(args.threads)
    from merge_service.pipeline import Merger
    from merge_service.sources import SourceResolver

    merger = Merger(SourceResolver(Path(args.root)), device=args.device)
    plan = merger.plan(_spec(args.strategy, args.target))
    t0 = time.perf_counter()
    built = merger.build(plan)
    seconds = time.perf_counter() - t0
    rss = peak_rss(os.getpid())
    result: dict[str, Any] = {
        "seconds": seconds,
        "rss": rss,
        "out_bytes": len(built.data),
        "sha256": built.sha256,
        "max_reported_error": built.max_relative_error,
        "estimate": merger.estimate_seconds(plan),
    }
    if args.errors:
        layers, shapes = args.layers, TINY if args.tiny else LLAMA3_8B
        result["errors"] = module_errors(plan, built, args.device, sampled_modules(layers, shapes))
    print("RESULT " + json.dumps(result), flush=True)


def service_linear_exact(root: Path, threads: int) -> dict[str, Any]:
    """The linear exact merge through a running merge service: ``Merge`` from the files to the last
    byte received over loopback (data chunks as views, not kept). Peak RSS is the service's (VmHWM)."""
    import grpc

    from benchmarks.bench_stream import ServiceProcess
    from loramerge.stream import DataView, merge_method
    from loramerge.v1 import merge_pb2

    args = [
        "--listen", "127.0.0.1:0", "--metrics-port", "0", "--adapter-root", str(root),
        "--device", "cpu", "--cache-memory-bytes", "8GiB", "--log-level", "INFO",
        "--hub-cache-dir", str(root / "hub"), "--s3-cache-dir", str(root / "s3"),
    ]  # fmt: skip
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        service = ServiceProcess(args)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    try:
        spec = merge_pb2.MergeSpec(ids=list(NAMES), weights=list(WEIGHTS))
        with grpc.insecure_channel(service.address) as channel:
            merge = merge_method(channel)
            t0 = time.perf_counter()
            received, digest = 0, ""
            for item in merge(merge_pb2.MergeRequest(spec=spec), timeout=3600):
                if isinstance(item, DataView):
                    received += len(item.data)
                elif item.WhichOneof("item") == "header":
                    digest = item.header.sha256
            seconds = time.perf_counter() - t0
        hwm = peak_rss(service.proc.pid)
    finally:
        service.close()
    return {"seconds": seconds, "rss": hwm, "out_bytes": received, "sha256": digest}


# ----------------------------------------------------------------------------------------- parent


@dataclass
class ScaleBench:
    title: str = "Merges at Llama-3-8B scale (Merger.build, files → bytes)"
    setup: str = ""
    floors: str = ""
    rows: list[list[Any]] = field(default_factory=list)
    errors: list[list[Any]] = field(default_factory=list)

    def markdown(self) -> str:
        parts = [
            self.setup,
            "",
            self.floors,
            "",
            table(
                (
                    "strategy",
                    "wall s",
                    "Plan's estimate s",
                    "÷ read+write floor",
                    "÷ compute floor",
                    "peak RSS GiB",
                    "RSS ÷ (in + out + 1 GiB)",
                    "sha256",
                ),
                self.rows,
            ),
        ]
        if self.errors:
            parts += [
                "",
                "Reconstruction error on sampled modules (‖M − BA‖/‖M‖ vs the exact dense merge M):",
                "",
                table(("strategy", "module", "ours", "truncated-SVD optimum", "ours ÷ optimum"), self.errors),
            ]
        return "\n".join(parts)


def log(msg: str) -> None:
    print(f"[bench_scale] {msg}", file=sys.stderr, flush=True)


def measure(
    layers: int, device: str, threads: int, tiny: bool, errors: bool, only: list[str] | None = None
) -> ScaleBench:
    shapes = TINY if tiny else LLAMA3_8B
    out = ScaleBench()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(tmp)
        log(f"writing 4 adapters, {layers} layers")
        in_bytes = write_adapters(root, layers, shapes)
        read_s = read_floor(root)
        wrate = write_rate(root)
        rate = matmul_rate(device)
        flops = compute_flops(layers, shapes)
        compute_s = flops / rate
        out.setup = (
            f"{len(NAMES)} adapters × {layers} layers × 7 projections "
            f"({'tiny shapes' if tiny else 'Llama-3-8B shapes'}: hidden {shapes.hidden}, intermediate "
            f"{shapes.intermediate}, k/v out {shapes.kv}), rank {RANK} bfloat16, {in_bytes / 1e6:.0f} MB in; "
            f"weights {list(WEIGHTS)}, density {DENSITY}; device {device}; torch threads {threads}; "
            "each row in its own process."
        )
        out.floors = (
            f"Floors in this run: reading the inputs once {read_s:.3f} s; writing {wrate / 1e9:.2f} GB/s; "
            f"matmul {rate / 1e9:.0f} GFLOP/s → compute floor {flops / 1e12:.3f} TFLOP = {compute_s:.2f} s."
        )
        for label, strategy, target in STRATEGIES:
            if only and strategy not in only and label not in only:
                continue
            log(f"{label} ...")
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.bench_scale",
                "--child",
                "--strategy",
                strategy,
                "--target",
                str(target),
                "--root",
                str(root),
                "--device",
                device,
                "--threads",
                str(threads),
                "--layers",
                str(layers),
            ]
            want_err = errors and not (strategy == "linear" and target == 0)
            if want_err:
                cmd.append("--errors")
            if tiny:
                cmd.append("--tiny")
            proc = subprocess.run(
                cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                raise RuntimeError(f"{label}: child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            r = json.loads(line.removeprefix("RESULT "))
            io_floor = read_s + r["out_bytes"] / wrate
            dense = strategy != "linear"
            budget = in_bytes + r["out_bytes"] + (1 << 30)
            out.rows.append(
                [
                    label,
                    r["seconds"],
                    f"{r['estimate']:.3g}",
                    f"{r['seconds'] / io_floor:.1f}×",
                    f"{r['seconds'] / compute_s:.1f}×" if dense else "–",
                    r["rss"] / 2**30,
                    f"{r['rss'] / budget:.2f}",
                    r["sha256"][:12],
                ]
            )
            log(f"{label}: {r['seconds']:.2f} s, RSS {r['rss'] / 2**30:.2f} GiB")
            if strategy == "linear" and target == 0:
                # The same merge through the running service (aim: within 3× reading + writing once).
                log("linear exact through the merge service ...")
                r = service_linear_exact(root, threads)
                io_floor = read_s + r["out_bytes"] / wrate
                out.rows.append(
                    [
                        "linear exact, merge service (Merge: files → bytes received)",
                        r["seconds"],
                        "–",
                        f"{r['seconds'] / io_floor:.1f}×",
                        "–",
                        r["rss"] / 2**30,
                        f"{r['rss'] / (in_bytes + r['out_bytes'] + (1 << 30)):.2f}",
                        r["sha256"][:12],
                    ]
                )
                log(f"service linear exact: {r['seconds']:.2f} s")
            for module, (ours, opt) in zip(
                sampled_modules(layers, shapes), r.get("errors", []), strict=False
            ):
                ratio = ours / opt if opt > 0 else (1.0 if ours < 1e-6 else math.inf)
                out.errors.append([label, module.removeprefix("model."), ours, opt, f"{ratio:.4f}"])
    return out


def settings_from_env() -> tuple[int, str, int]:
    layers = int(os.environ.get("BENCH_SCALE_LAYERS", "32"))
    device = os.environ.get("BENCH_SCALE_DEVICE", "cpu")
    threads = int(os.environ.get("BENCH_THREADS") or os.environ.get("BENCH_SCALE_THREADS") or "2")
    return layers, device, threads


def run(report: Any) -> ScaleBench:
    """Entry point for benchmarks/run.py: BENCH_SCALE_LAYERS (32), BENCH_SCALE_DEVICE (cpu),
    BENCH_THREADS (2)."""
    layers, device, threads = settings_from_env()
    prev = torch.get_num_threads()
    try:
        r = measure(layers, device, threads, tiny=False, errors=True)
    finally:
        torch.set_num_threads(prev)
    report(r)
    return r


def main(argv: list[str] | None = None) -> int:
    layers, device, threads = settings_from_env()
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_scale", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--device", default=device)
    p.add_argument("--threads", type=int, default=threads)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (hidden 256) for smoke tests")
    p.add_argument("--no-errors", action="store_true", help="skip the reconstruction-error check")
    p.add_argument("--only", nargs="*", help="strategies or labels to run")
    p.add_argument(
        "--append", type=Path, help="append the section to this Markdown file (e.g. BENCHMARKS.md)"
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    p.add_argument("--target", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--errors", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    from benchmarks.report import Report

    report = Report()
    report(measure(args.layers, args.device, args.threads, args.tiny, not args.no_errors, args.only))
    if args.append:
        report.append_to(args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
