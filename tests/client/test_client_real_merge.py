"""The clients against the real merge service (a subprocess over the test adapters): every merge
method, errors from real validation mapped to their classes, and a retry across a restart."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import grpc
import pytest
from safetensors import safe_open

from loramerge import errors as E
from loramerge_client import Adapter, AsyncMergeClient, MergeClient, MergedAdapters, RetryPolicy
from tests.client.conftest import MergeServiceProc

TIES = MergedAdapters(ids=["a", "e"], weights=[0.7, 0.3], merge_strategy="ties", density=0.5)


def test_plan_merge_cache_and_evict(real_merge: MergeServiceProc, tmp_path: Path) -> None:
    with MergeClient(real_merge.address, timeout=60) as client:
        assert client.health() == "SERVING"
        plan = client.plan(TIES)
        assert [a.id for a in plan.adapters] == ["a", "e"] and plan.rank > 0

        progress = []
        first = client.merge(TIES, output_dir=tmp_path / "m", on_progress=progress.append)
        assert first.merge_key == plan.merge_key and first.header.rank == plan.rank
        merging = [p for p in progress if p.stage == "merge"]  # a cache miss reports its build
        assert merging and merging[-1].done == merging[-1].total > 0
        with safe_open(tmp_path / "m" / first.file_name, "pt") as f:  # an independent reader
            keys = list(f.keys())
        assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
        config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
        assert config["r"] == first.header.rank

        again = client.merge(TIES)
        assert again.header.cache_hit and again.data == first.data
        assert client.plan(TIES).cached
        assert first.merge_key in [e.merge_key for e in client.list_cached().entries]
        assert client.evict(first.merge_key) == 1
        assert not client.plan(TIES).cached


@pytest.mark.parametrize(
    ("spec", "error", "field_part"),
    [
        (MergedAdapters(ids=["a", "e"], merge_strategy="ties", density=1.5), E.InvalidArgument, "density"),
        (MergedAdapters(ids=["a", "e"], weights=[1.0]), E.InvalidArgument, "weights"),
        (MergedAdapters(adapters=[Adapter("a"), Adapter("nope", source="local")]), E.NotFound, "adapters"),
        (MergedAdapters(ids=["a", "d"]), E.FailedPrecondition, ""),  # d names another base model
        (MergedAdapters(ids=["a", "b"], space="factors"), E.InvalidArgument, ""),  # ranks 8 and 4
    ],
)
def test_real_errors_map_to_classes(real_merge: MergeServiceProc, spec, error, field_part) -> None:
    with MergeClient(real_merge.address, timeout=60) as client, pytest.raises(E.LoramergeError) as info:
        client.plan(spec)
    got = info.value
    assert type(got) is error and got.code == error.code, f"{got.code}: {got}"
    if field_part:
        assert any(field_part in v.field for v in got.violations), got.violations


def test_async_client_against_real_service(real_merge: MergeServiceProc) -> None:
    async def run() -> None:
        async with AsyncMergeClient(real_merge.address, timeout=60) as client:
            plan = await client.plan(TIES)
            result = await client.merge(TIES)
            assert result.merge_key == plan.merge_key and len(result.data) == result.header.total_bytes
            with pytest.raises(E.NotFound):
                await client.plan(MergedAdapters(adapters=[Adapter("zzz", source="local")]))

    asyncio.run(run())


def test_retry_after_merge_service_restart(real_merge: MergeServiceProc) -> None:
    """A call made while the service is down waits with backoff and succeeds once it is back."""
    patient = RetryPolicy(max_attempts=200, initial_backoff=0.1, max_backoff=0.5)
    spec = MergedAdapters(ids=["a", "b"], weights=[0.5, 0.5])
    with MergeClient(real_merge.address, retry=patient, timeout=120) as client:
        before = client.merge(spec)
        real_merge.stop()
        with MergeClient(real_merge.address, retry=RetryPolicy(max_attempts=1)) as once:
            with pytest.raises(E.Unavailable) as info:
                once.plan(spec, timeout=5)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE

        restarted = threading.Timer(1.0, real_merge.start)
        start = time.monotonic()
        restarted.start()
        try:
            after = client.merge(spec)  # issued while down; retried until the restart completes
        finally:
            restarted.join()
        assert time.monotonic() - start >= 1.0
        assert after.data == before.data
