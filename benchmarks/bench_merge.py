"""The merge math side by side with PEFT's ``add_weighted_adapter`` on the same adapters, in one run.

Four rank-16 adapters (lora_alpha = r, so PEFT's handling of the merged adapter's scale cannot
matter) on all seven projections of two TinyLlama-1.1B layers (hidden 2048, intermediate 5632,
32 heads, 4 KV heads → k/v out 256), weights 1.0, 0.8, 0.6, 0.5, density 0.5.

- floor: reading every input factor once (a fused norm per tensor), the memory-bandwidth bound.
- delta linear, exact: our rank concatenation vs PEFT ``cat`` (same maths, rank 64).
- delta linear at rank 16: our QR + small-core SVD vs PEFT ``svd`` (dense ΔW, full SVD).
- delta ties / dare_ties at rank 16: our blocked dense merge + randomized SVD vs PEFT ``ties_svd`` /
  ``dare_ties_svd`` (dense merge + full SVD). Error = ‖M − BA‖/‖M‖ against the exact dense merge M;
  for ties PEFT's own output gives the optimum; for dare_ties (PEFT draws other masks) the optimum
  for our M comes from its singular values.
- factors ties: ours vs PEFT ``ties`` (PEFT's factor path). Times only: PEFT splits √(w·s) over
  A and B while the factors space (LoRAX) puts w on both, so the numbers differ by design.
Our times are the merge of all 14 modules from tensors in memory, best of a few runs; PEFT's SVD
paths run once. ``Merger.build`` (files in, safetensors bytes out) is timed too.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import table

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NAMES = ("a0", "a1", "a2", "a3")
WEIGHTS = (1.0, 0.8, 0.6, 0.5)
RANK = 16
DENSITY = 0.5
SEED = 1234


@dataclass
class Row:
    what: str
    ours_s: float
    peft: str
    peft_s: float | None
    ours_err: float | None = None  # worst module
    ref_err: float | None = None  # PEFT's (or the optimum's) worst module
    note: str = ""


@dataclass
class MergeBench:
    title: str = "Merge math vs PEFT add_weighted_adapter"
    shapes: str = ""
    floor_s: float = 0.0
    build_s: float = 0.0
    rows: list[Row] = field(default_factory=list)
    err_ratio_mean: dict[str, float] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = [self.shapes, "", f"Read-once floor: {self.floor_s * 1e3:.2f} ms.", ""]
        body = []
        for r in self.rows:
            speed = f"{r.peft_s / r.ours_s:.1f}×" if r.peft_s else "–"
            err = ratio = "–"
            if r.ours_err is not None and r.ref_err is not None:
                err = f"{r.ours_err:.4f} / {r.ref_err:.4f}"
                ratio = f"{r.ours_err / r.ref_err:.4f}" if r.ref_err > 0 else "–"
            body.append(
                (
                    r.what,
                    f"{r.ours_s * 1e3:.1f} ms",
                    f"{r.ours_s / self.floor_s:.1f}×",
                    r.peft,
                    f"{r.peft_s * 1e3:.1f} ms" if r.peft_s else "–",
                    speed,
                    err,
                    ratio,
                    r.note,
                )
            )
        header = (
            "ours",
            "time",
            "÷ floor",
            "PEFT",
            "PEFT time",
            "PEFT ÷ ours",
            "worst rel. error ours / ref",
            "error ratio",
            "note",
        )
        lines.append(table(header, body))
        lines += [
            "",
            f"`Merger.build` (4 adapter files in, delta linear, bytes out): {self.build_s * 1e3:.1f} ms.",
        ]
        if self.err_ratio_mean:
            parts = ", ".join(f"{k} {v:.4f}" for k, v in self.err_ratio_mean.items())
            lines += ["", f"Mean over modules of (our error ÷ reference error): {parts}."]
        return "\n".join(lines)


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def best(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def build_peft_model() -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=64,
        num_hidden_layers=2,
        vocab_size=256,
    )
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    base = base.to_empty(device="cpu")  # base weights are never read by a merge
    lcfg = LoraConfig(
        r=RANK, lora_alpha=RANK, target_modules=list(PROJECTIONS), lora_dropout=0.0, bias="none"
    )
    model = get_peft_model(base, lcfg, adapter_name=NAMES[0])
    for name in NAMES[1:]:
        model.add_adapter(name, lcfg)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            if ".lora_A." in pname:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            elif ".lora_B." in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def lora_layers(model: Any) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def peft_delta(layer: Any, adapter: str) -> torch.Tensor:
    return layer.get_delta_weight(adapter).detach().float()


def rel(m: torch.Tensor, approx: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(m - approx) / torch.linalg.vector_norm(m))


def measure() -> MergeBench:
    from merge_service import strategies
    from merge_service.adapter import LoraModule
    from merge_service.module_merge import Workspace, merge_module
    from merge_service.pipeline import Merger
    from merge_service.sources import SourceResolver
    from merge_service.spec import AdapterRef, MergeSpec, SignMethod, Space
    from merge_service.strategies import MergeParams, tensor_seed

    out = MergeBench()
    model = build_peft_model()
    layers = lora_layers(model)
    parts = {
        name: [
            LoraModule(layer.lora_A[a].weight.detach(), layer.lora_B[a].weight.detach(), layer.scaling[a])
            for a in NAMES
        ]
        for name, layer in layers.items()
    }
    n_params = sum(p.A.numel() + p.B.numel() for ps in parts.values() for p in ps)
    out.shapes = (
        f"{len(NAMES)} adapters × {len(layers)} modules (2 TinyLlama-1.1B layers), rank {RANK}, alpha = r; "
        f"{n_params * 4 / 2**20:.1f} MiB of float32 factors in; weights {list(WEIGHTS)}, density {DENSITY}; "
        f"torch threads {torch.get_num_threads()}."
    )
    keys = [f"bench-{a}#0" for a in NAMES]
    tensors = [t for ps in parts.values() for p in ps for t in (p.A, p.B)]
    out.floor_s = best(lambda: [torch.linalg.vector_norm(t) for t in tensors], 7)

    def ours(strategy: str, space: Space, rank: int, **kw: Any) -> tuple[float, dict[str, Any]]:
        params = MergeParams(density=DENSITY, sign_method=SignMethod.TOTAL, seed=SEED, **kw)
        s = strategies.get(strategy)
        results: dict[str, Any] = {}

        def go() -> None:
            ws = Workspace()
            with torch.no_grad():
                for name, ps in parts.items():
                    results[name] = merge_module(name, ps, WEIGHTS, keys, s, params, space, rank, ws)

        return best(go, 7 if strategy == "linear" else 2), results

    def peft(kind: str, reps: int = 1, **kw: Any) -> tuple[float, dict[str, torch.Tensor]]:
        times = []
        deltas: dict[str, torch.Tensor] = {}
        for i in range(reps):
            name = f"m-{kind}-{i}"
            t0 = time.perf_counter()
            model.add_weighted_adapter(list(NAMES), list(WEIGHTS), name, combination_type=kind, **kw)
            times.append(time.perf_counter() - t0)
            if i == reps - 1:
                deltas = {n: peft_delta(layer, name) for n, layer in layers.items()}
            model.delete_adapter(name)
        return min(times), deltas

    # delta linear, exact
    log("delta linear, exact")
    t_lin, res_lin = ours("linear", Space.DELTA, RANK * len(NAMES))
    t_cat, cat = peft("cat", reps=3)
    worst_cat = max(rel(cat[n], r.B @ r.A) for n, r in res_lin.items())
    out.rows.append(
        Row(
            "delta linear, exact (rank 64)",
            t_lin,
            "cat",
            t_cat,
            note=f"max rel. diff to PEFT cat {worst_cat:.1e}",
        )
    )

    # delta linear at rank 16
    log("delta linear at rank 16 (PEFT svd is slow)")
    t_lin16, res_lin16 = ours("linear", Space.DELTA, RANK)
    t_svd, svd = peft("svd", svd_rank=RANK)
    exact = {n: cat[n] for n in layers}
    peft_err = {n: rel(exact[n], svd[n]) for n in layers}
    our_err = {n: r.relative_error for n, r in res_lin16.items()}
    out.rows.append(
        Row(
            "delta linear, rank 16 (QR + core SVD)",
            t_lin16,
            "svd",
            t_svd,
            max(our_err.values()),
            max(peft_err.values()),
        )
    )
    out.err_ratio_mean["linear"] = sum(our_err[n] / peft_err[n] for n in layers) / len(layers)
    del svd, cat, exact

    # delta ties at rank 16
    log("delta ties (PEFT ties_svd is slow)")
    t_ties, res_ties = ours("ties", Space.DELTA, RANK)
    t_ties_svd, ties_svd = peft("ties_svd", svd_rank=RANK, density=DENSITY, majority_sign_method="total")
    ties_err, ours_ties_err = {}, {}
    params = MergeParams(density=DENSITY, sign_method=SignMethod.TOTAL)
    for n, ps in parts.items():
        m = strategies.ties([(p.B * p.scale) @ p.A for p in ps], WEIGHTS, params, [])
        ties_err[n] = rel(m, ties_svd[n])
        ours_ties_err[n] = rel(m, res_ties[n].B @ res_ties[n].A)
    out.rows.append(
        Row(
            "delta ties, rank 16 (blocked + randomized SVD)",
            t_ties,
            "ties_svd",
            t_ties_svd,
            max(ours_ties_err.values()),
            max(ties_err.values()),
            note="ref = PEFT (full SVD: the optimum)",
        )
    )
    out.err_ratio_mean["ties"] = sum(ours_ties_err[n] / ties_err[n] for n in layers) / len(layers)
    del ties_svd

    # delta dare_ties at rank 16
    log("delta dare_ties (PEFT dare_ties_svd is slow)")
    t_dare, res_dare = ours("dare_ties", Space.DELTA, RANK)
    t_dare_svd, _ = peft("dare_ties_svd", svd_rank=RANK, density=DENSITY, majority_sign_method="total")
    opt_err, ours_dare_err = {}, {}
    dparams = MergeParams(density=DENSITY, sign_method=SignMethod.TOTAL, seed=SEED)
    for n, ps in parts.items():
        seeds = [tensor_seed(SEED, n, k, "delta") for k in keys]
        m = strategies.dare_ties([(p.B * p.scale) @ p.A for p in ps], WEIGHTS, dparams, seeds).double()
        s = torch.linalg.svdvals(m)
        opt_err[n] = math.sqrt(float((s[RANK:] ** 2).sum() / (s**2).sum()))
        ours_dare_err[n] = rel(m, (res_dare[n].B @ res_dare[n].A).double())
    out.rows.append(
        Row(
            "delta dare_ties, rank 16",
            t_dare,
            "dare_ties_svd",
            t_dare_svd,
            max(ours_dare_err.values()),
            max(opt_err.values()),
            note="ref = full-SVD optimum of our M",
        )
    )
    out.err_ratio_mean["dare_ties"] = sum(ours_dare_err[n] / opt_err[n] for n in layers) / len(layers)

    # factors ties
    log("factors ties")
    t_fties, _ = ours("ties", Space.FACTORS, RANK)
    t_peft_ties, _ = peft("ties", reps=3, density=DENSITY, majority_sign_method="total")
    out.rows.append(Row("factors ties (rank 16)", t_fties, "ties (factors)", t_peft_ties))

    # the whole pipeline from files
    log("Merger.build from files")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, selected_adapters=list(NAMES))
        root = Path(tmp)
        found = {p.parent.name: p.parent for p in root.rglob("adapter_config.json")}
        merger = Merger(SourceResolver(root), device="cpu")
        spec = MergeSpec(
            adapters=tuple(
                AdapterRef(str(found[a].relative_to(root)), weight=w)
                for a, w in zip(NAMES, WEIGHTS, strict=True)
            )
        )
        plan = merger.plan(spec)
        out.build_s = best(lambda: merger.build(plan), 3)
    return out


def run(report: Any) -> MergeBench:
    """Entry point for benchmarks/run.py. BENCH_THREADS sets torch's intra-op threads for this benchmark
    (both sides alike; on a shared or oversubscribed machine 1 gives steadier numbers)."""
    prev = torch.get_num_threads()
    threads = os.environ.get("BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    try:
        r = measure()
    finally:
        torch.set_num_threads(prev)
    report(r)
    return r


if __name__ == "__main__":
    run(lambda r: print(r.markdown()))
