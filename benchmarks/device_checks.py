"""Correctness checks of the merge path on one device (``--device cuda`` on a GPU machine; ``cpu`` in CI).

Needs torch, numpy, safetensors, grpcio, protobuf (numba optional), never vLLM:
1. importing the merge service (pipeline, servicer, server) does not import vllm;
2. same merge key ⇒ same bytes on one device: every strategy built twice gives one sha256;
3. DARE masks on the device are byte-equal to the CPU's (the masks and the sparsity pattern of a
   one-adapter dare_linear merge);
4. merges on the device equal the CPU's within tolerance (‖ΔW_dev − ΔW_cpu‖/‖ΔW_cpu‖ per module, on
   the merged products B·A, for every strategy, delta and factors spaces).

    python -m benchmarks.device_checks --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

TOLERANCE = 2e-3


def log(msg: str) -> None:
    print(f"[device_checks] {msg}", flush=True)


def check_no_vllm() -> None:
    import merge_service.pipeline
    import merge_service.server
    import merge_service.servicer  # noqa: F401

    assert "vllm" not in sys.modules, "importing merge_service imported vllm"
    log("ok: merge_service imports without vllm")


def check_masks(device: str) -> None:
    from merge_service import strategies
    from merge_service.adapter import LoraModule
    from merge_service.module_merge import dense_merge
    from merge_service.strategies import MergeParams, bernoulli_mask

    for seed in (1, 2**40 + 3):
        cpu = bernoulli_mask((257, 129), 0.3, seed, torch.device("cpu"))
        dev = bernoulli_mask((257, 129), 0.3, seed, torch.device(device)).cpu()
        assert torch.equal(cpu, dev), "DARE mask differs from the CPU's"
    g = torch.Generator().manual_seed(0)
    part = LoraModule(
        torch.randn(8, 384, generator=g) + 3.0, torch.randn(512, 8, generator=g).abs() + 1.0, 1.0
    )
    strategy, params = strategies.get("dare_linear"), MergeParams(density=0.4, seed=5)
    masks = []
    for dev in ("cpu", device):
        p = LoraModule(part.A.to(dev), part.B.to(dev), part.scale)
        merged, _, _ = dense_merge([p], [1.0], strategy, params, [99])
        masks.append((merged != 0).cpu())
    assert torch.equal(masks[0], masks[1]), "dare_linear keeps other entries on the device than on the CPU"
    log("ok: DARE masks byte-equal to the CPU's")


def check_builds(device: str, layers: int) -> None:
    from safetensors.torch import load as load_bytes

    from benchmarks.bench_scale import TINY, _spec, write_adapters
    from merge_service.pipeline import Merger
    from merge_service.sources import SourceResolver
    from merge_service.spec import Space

    cases = [
        ("linear", 0, Space.DELTA),
        ("linear", 16, Space.DELTA),
        ("ties", 16, Space.DELTA),
        ("dare_ties", 16, Space.DELTA),
        ("dare_linear", 16, Space.DELTA),
        ("magnitude_prune", 16, Space.DELTA),
        ("ties", 0, Space.FACTORS),
    ]
    with tempfile.TemporaryDirectory(prefix="device-checks-") as tmp:
        root = Path(tmp)
        write_adapters(root, layers, TINY, seed=3)
        resolver = SourceResolver(root)
        on_dev, on_cpu = Merger(resolver, device=device), Merger(resolver, device="cpu")
        for strategy, target, space in cases:
            spec = replace(_spec(strategy, target), space=space)
            plan = on_dev.plan(spec)
            t0 = time.perf_counter()
            first = on_dev.build(plan)
            second = on_dev.build(plan)
            assert first.device.startswith(device.split(":")[0]), (first.device, device)
            assert first.sha256 == second.sha256 and first.data == second.data, f"{strategy}: bytes differ"
            ref = on_cpu.build(on_cpu.plan(spec))
            a, b = load_bytes(first.data), load_bytes(ref.data)
            worst = 0.0
            for name in a:
                if ".lora_A." not in name:
                    continue
                nb = name.replace(".lora_A.", ".lora_B.")
                dw = a[nb].double() @ a[name].double()
                cw = b[nb].double() @ b[name].double()
                scale = float(cw.norm()) or 1.0
                worst = max(worst, float((dw - cw).norm()) / scale)
            assert worst <= TOLERANCE, f"{strategy} {space}: {device} differs from cpu by {worst:.2e}"
            log(
                f"ok: {strategy} {space} r{target or 'exact'}: same bytes twice on {device}; "
                f"vs cpu {worst:.1e} ({time.perf_counter() - t0:.2f} s)"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.device_checks", description=__doc__.splitlines()[0]
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu", file=sys.stderr)
        return 2
    check_no_vllm()
    check_masks(args.device)
    check_builds(args.device, args.layers)
    log("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
