"""As many distinct merged adapters at once as vLLM has LoRA slots (``max_loras``) must not kill the engine.

Found by the load test: the inference service used to pin its all-zero base adapter in one of vLLM's
``max_loras`` slots, but vLLM's scheduler still admits ``max_loras`` distinct adapters into one batch.
When that many merged adapters ran together, activating the last one evicted one of the batch's own
adapters and the worker failed (``KeyError`` in ``convert_mapping``): EngineDeadError, and every
request got UNAVAILABLE until a restart. Any client could trigger it by sending ``max_loras``
different specs at the same time. The zero adapter is no longer pinned: vLLM evicts it like any other
adapter and reloads it from its folder when a base request needs it.

Here ``max_loras`` merged specs run at once, then again with base requests beside them; each answer
(greedy) must equal the one the same request got alone, and the service must still be serving.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from loramerge.v1 import inference_pb2, merge_pb2
from tests.faults.stack import MAX_LORAS, Stack

pytestmark = pytest.mark.e2e

I = inference_pb2  # noqa: E741
M = merge_pb2
TOKENS = 200  # long enough that every request is still generating when the last adapter arrives
BASE_REQUESTS = 2


def test_max_loras_distinct_adapters_at_once_leave_the_engine_serving(hardened_stack: Stack) -> None:
    stack = hardened_stack
    specs = [
        M.MergeSpec(adapters=[M.AdapterRef(id="a", weight=0.05 + 0.1 * i), M.AdapterRef(id="c", weight=0.5)])
        for i in range(MAX_LORAS)
    ]
    requests = [
        I.GenerateRequest(
            prompt="Once upon a time",
            sampling=I.SamplingParams(max_tokens=TOKENS, ignore_eos=True),
            merged_adapters=spec,
        )
        for spec in specs
    ] + [
        I.GenerateRequest(
            prompt="Once upon a time", sampling=I.SamplingParams(max_tokens=TOKENS, ignore_eos=True)
        )
    ] * BASE_REQUESTS

    def generate(request: I.GenerateRequest) -> list[int]:
        reply = stack.inference_stub().Generate(request, metadata=stack.inference_metadata, timeout=180)
        return list(reply.token_ids)

    alone = [generate(r) for r in requests]  # one at a time: each batch holds a single adapter
    assert all(len(t) == TOKENS for t in alone)

    def together(batch: list[I.GenerateRequest]) -> list[list[int]]:
        with ThreadPoolExecutor(len(batch)) as pool:
            return list(pool.map(generate, batch))

    # Merged adapters only: the batch needs every slot (what killed the engine with the pinned adapter).
    assert together(requests[:MAX_LORAS]) == alone[:MAX_LORAS]
    # With base requests too: the zero adapter, evicted from its slot, comes back and still answers as
    # the base model.
    assert together(requests) == alone
    assert stack.serving()
