"""The asyncio clients against the scripted servicers: every method, retries, stream resume, errors."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from loramerge import errors as E
from loramerge.v1 import merge_pb2
from loramerge_client import (
    NO_RETRY,
    AsyncInferenceClient,
    AsyncMergeClient,
    MergedAdapters,
    RetryPolicy,
    SamplingParams,
)
from tests.client.conftest import FakeStack
from tests.client.fakes import CONFIG, SHA, WEIGHTS

FAST = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)
SPEC = MergedAdapters(ids=["a", "b"], weights=[0.5, 0.5], merge_strategy="dare_ties", density=0.7, seed=1)


def test_async_merge_client(fakes: FakeStack, tmp_path: Path) -> None:
    async def run() -> None:
        async with AsyncMergeClient(fakes.address, retry=FAST, timeout=10) as client:
            fakes.merge.fail = [E.Unavailable("restarting")]
            assert (await client.plan(SPEC)).merge_key == "key-1"
            assert fakes.merge.seen.requests[-1].spec.merge_strategy == merge_pb2.DARE_TIES

            fakes.merge.break_after = 2
            progress = []
            result = await client.merge(SPEC, output_dir=tmp_path / "o", on_progress=progress.append)
            assert result.data == WEIGHTS and result.sha256 == SHA and result.resumed == 1
            assert len(progress) == 3
            assert (tmp_path / "o" / "adapter_config.json").read_text() == CONFIG
            assert fakes.merge.seen.requests[-1].resume_offset == 2 * 4096

            kinds = [c.WhichOneof("item") async for c in client.merge_chunks(SPEC)]
            assert kinds[0] == "progress" and kinds[-1] == "trailer"
            assert (await client.list_cached()).entries[0].merge_key == "key-1"
            assert await client.evict("key-1") == 1
            assert await client.health() == "SERVING"

    asyncio.run(run())


def test_async_inference_client(fakes: FakeStack, tmp_path: Path) -> None:
    async def run() -> None:
        async with (
            AsyncInferenceClient(fakes.address, retry=FAST, timeout=10, token="tk") as client,
            AsyncMergeClient(fakes.address, timeout=10) as merge,
        ):
            resp = await client.generate("a b", SPEC, SamplingParams(max_tokens=4))
            assert resp.text == "echo: a b"
            assert fakes.inference.seen.metadata[-1]["authorization"] == "Bearer tk"

            fakes.inference.fail = [E.Unavailable("restarting")]
            text = [d.text async for d in client.generate_stream("x y z")]
            assert "".join(text) == "x y z" and len(fakes.inference.seen.requests) == 3

            fakes.inference.break_after = 1
            got = []
            with pytest.raises(E.Unavailable):
                async for d in client.generate_stream("p q r"):
                    got.append(d.text)
            assert got == ["p "]

            assert (await client.load_adapter(merge.merge_chunks(SPEC))).merge_key == "key-1"
            result = await merge.merge(SPEC)
            fakes.inference.fail = [E.Unavailable("restarting")]
            assert (await client.load_adapter(result)).merge_key == "key-1"
            folder = result.write(tmp_path / "adapter")
            assert (await client.load_adapter(folder, merge_key="k2")).merge_key == "k2"
            assert fakes.inference.loaded[-1][1] == WEIGHTS

            assert (await client.list_adapters()).max_lora_rank == 16
            assert await client.unload_adapter("key-1") is True
            assert await client.health() == "SERVING"

    asyncio.run(run())


def test_async_errors_and_deadline(fakes: FakeStack) -> None:
    async def run() -> None:
        async with AsyncInferenceClient(fakes.address, retry=NO_RETRY) as client:
            fakes.inference.fail = [E.NotFound("adapter 'zz' not found", field="adapter_id")]
            with pytest.raises(E.NotFound) as info:
                await client.generate("hi", "zz")
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            assert [(v.field, v.description) for v in info.value.violations] == [
                ("adapter_id", "adapter 'zz' not found")
            ]

            fakes.inference.delay = 2.0
            start = time.monotonic()
            with pytest.raises(E.DeadlineExceeded):
                await client.generate("hi", timeout=0.3)
            assert time.monotonic() - start < 1.5

    asyncio.run(run())
