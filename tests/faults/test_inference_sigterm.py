"""SIGTERM to the inference service while generations stream: they finish, new calls are refused, the
process exits 0 within its grace period, and it leaves no adapter folder and no child process behind.

It stops the ``hardened_stack`` inference service, so it runs after every other test.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from loramerge.v1 import inference_pb2, inference_pb2_grpc, merge_pb2
from tests.faults.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.stops_a_service]

I = inference_pb2  # noqa: E741
M = merge_pb2
LONG = 320  # tokens: long enough to be streaming when the signal lands


def stream_all(stack: Stack, request: I.GenerateRequest, first_seen) -> list[I.GenerateStreamResponse]:
    call = stack.inference_stub().GenerateStream(request, metadata=stack.inference_metadata, timeout=120)
    out = [next(call)]
    first_seen()
    out.extend(call)
    return out


def test_sigterm_lets_streams_finish_refuses_new_calls_and_cleans_up(hardened_stack: Stack) -> None:
    stack = hardened_stack
    stack.ensure_inference()
    sampling = I.SamplingParams(max_tokens=LONG, ignore_eos=True)
    merged = M.MergeSpec(adapters=[M.AdapterRef(id="a", weight=0.5), M.AdapterRef(id="b", weight=0.5)])
    requests = [
        I.GenerateRequest(prompt="The quick brown fox", sampling=sampling),
        I.GenerateRequest(prompt="Once upon a time", sampling=sampling, merged_adapters=merged),
    ]
    run_dir = stack.run_dir()
    ready_file = stack.inference.extra["ready_file"]
    proc = stack.inference.proc
    assert proc is not None

    started = []
    with ThreadPoolExecutor(len(requests)) as pool:
        calls = [pool.submit(stream_all, stack, r, lambda: started.append(1)) for r in requests]
        deadline = time.monotonic() + 120
        while len(started) < len(requests):
            assert time.monotonic() < deadline, "the generations did not start"
            for c in calls:
                if c.done():
                    c.result()  # raises what went wrong
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        t_signal = time.monotonic()

        refused = None
        while time.monotonic() - t_signal < 20 and refused is None:
            with stack.channel(stack.inference.address) as fresh:
                try:
                    inference_pb2_grpc.InferenceServiceStub(fresh).ListAdapters(
                        I.ListAdaptersRequest(), metadata=stack.inference_metadata, timeout=2
                    )
                    time.sleep(0.05)
                except grpc.RpcError as e:
                    refused = e.code()
        assert refused == grpc.StatusCode.UNAVAILABLE, "new calls were still accepted after SIGTERM"
        results = [c.result(60) for c in calls]

    for stream in results:
        assert stream[-1].finish_reason == I.LENGTH
        assert stream[-1].completion_tokens == LONG
        assert sum(len(m.token_ids) for m in stream) == LONG
    assert results[1][0].adapter.merge_key  # the merged one held its adapter to the end

    assert proc.wait(40) == 0
    assert time.monotonic() - t_signal < 30 + 10  # grace_seconds 30, plus engine shutdown
    assert not run_dir.exists() and not os.path.exists(str(ready_file))
    deadline = time.monotonic() + 20
    while True:  # vLLM's engine processes went with it
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "child processes outlived the inference service"
        time.sleep(0.2)
    log = stack.inference.log_text()
    assert '"draining"' in log and '"server stopped"' in log
