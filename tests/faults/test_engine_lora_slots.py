"""As many distinct merged adapters at once as vLLM has LoRA slots (``max_loras``) must not kill the engine.

Found by the load test: on CPU the inference service pins its all-zero base adapter in one of vLLM's
``max_loras`` slots, but vLLM's scheduler still admits ``max_loras`` distinct adapters into one
batch. When that many merged adapters run together (no base request among them), activating the last
one evicts one of the batch's own adapters and the worker fails (``KeyError`` in
``convert_mapping``): EngineDeadError, and every request gets UNAVAILABLE until a restart. Any client
can trigger it by sending ``max_loras`` different specs at the same time.

Checked with AsyncLLM directly (4 slots, 4 merged adapters and base requests at once): with
``pin_lora`` of the zero adapter the engine dies; without it all requests complete (vLLM reloads an
unpinned zero adapter from its directory when needed). Marked xfail (strict) until
inference_service/engine.py stops pinning it. It may stop the ``hardened_stack`` inference service,
so it runs last.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from loramerge.v1 import inference_pb2, merge_pb2

from tests.faults.stack import MAX_LORAS, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.stops_a_service]

I = inference_pb2  # noqa: E741
M = merge_pb2


@pytest.mark.xfail(
    strict=True, reason="the pinned zero adapter takes a LoRA slot vLLM's scheduler still hands out"
)
def test_max_loras_distinct_adapters_at_once_leave_the_engine_serving(hardened_stack: Stack) -> None:
    stack = hardened_stack
    stack.ensure_inference()
    specs = [
        M.MergeSpec(adapters=[M.AdapterRef(id="a", weight=0.05 + 0.1 * i), M.AdapterRef(id="c", weight=0.5)])
        for i in range(MAX_LORAS)
    ]

    def generate(spec: M.MergeSpec) -> int:
        request = I.GenerateRequest(
            prompt="Once upon a time",
            sampling=I.SamplingParams(max_tokens=160, ignore_eos=True),
            merged_adapters=spec,
        )
        stream = stack.inference_stub().GenerateStream(
            request, metadata=stack.inference_metadata, timeout=180
        )
        return list(stream)[-1].completion_tokens

    try:
        with ThreadPoolExecutor(len(specs)) as pool:
            done = [f.result() for f in [pool.submit(generate, s) for s in specs]]
        assert done == [160] * len(specs)
        assert stack.serving()
    except grpc.RpcError as e:
        proc = stack.inference.proc
        if proc is not None and proc.poll() is None:  # a dead engine makes the service exit: let it
            try:
                proc.wait(60)
            except Exception:
                stack.inference.stop()
        pytest.fail(f"{e.code().name}: {e.details()}")
