"""Merging adapters from S3 mixed with local ones gives the bytes of the same merge from local copies."""

from __future__ import annotations

from pathlib import Path

import pytest

from loramerge.peft import WEIGHTS_FILE
from merge_service.pipeline import Merger
from merge_service.sources import SourceResolver
from merge_service.sources.s3 import S3Settings, S3Source
from merge_service.spec import AdapterRef, MergeSpec, SourceKind, Strategy
from tests.s3.conftest import PUBLIC_BUCKET, REGION, S3Server


@pytest.fixture(scope="module")
def merger(s3_server: S3Server, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Merger:
    for name in ("a", "c"):
        s3_server.upload_adapter(adapter_root / name, PUBLIC_BUCKET, f"merge/{name}")
    resolver = SourceResolver(adapter_root, max_adapter_bytes=64 * 1024**2)
    settings = S3Settings(
        endpoint_url=s3_server.endpoint_url, region=REGION, cache_dir=tmp_path_factory.mktemp("s3-cache")
    )
    resolver.register(S3Source(settings, max_adapter_bytes=64 * 1024**2, session=s3_server.reader.session()))
    return Merger(resolver, device="cpu")


@pytest.mark.parametrize(
    ("strategy", "density"), [(Strategy.LINEAR, None), (Strategy.DARE_TIES, 0.5), (Strategy.TIES, 0.7)]
)
def test_mixed_merge_equals_local_merge(merger: Merger, strategy: Strategy, density: float | None) -> None:
    s3_a = f"s3://{PUBLIC_BUCKET}/merge/a"
    mixed = MergeSpec(
        adapters=(
            AdapterRef(s3_a, weight=0.7),
            AdapterRef("b", weight=0.4),
            AdapterRef(f"s3://{PUBLIC_BUCKET}/merge/c"),
        ),
        strategy=strategy,
        density=density,
    )
    local = MergeSpec(
        adapters=(
            AdapterRef("a", weight=0.7),
            AdapterRef("b", weight=0.4),
            AdapterRef("c", source=SourceKind.LOCAL),
        ),
        strategy=strategy,
        density=density,
    )
    mixed_plan, local_plan = merger.plan(mixed), merger.plan(local)
    assert [s.kind for s in mixed_plan.sources] == [SourceKind.S3, SourceKind.LOCAL, SourceKind.S3]
    assert mixed_plan.sources[0].revision  # the ETags (an unversioned bucket)
    # Same bytes in, same digests, same key: the merge cache serves both requests.
    assert mixed_plan.merge_key == local_plan.merge_key
    built_mixed, built_local = merger.build(mixed_plan), merger.build(local_plan)
    assert built_mixed.data == built_local.data


def test_overwritten_object_gives_a_new_merge_key(
    merger: Merger, s3_server: S3Server, adapter_root: Path
) -> None:
    s3_server.upload_adapter(adapter_root / "a", PUBLIC_BUCKET, "merge/moving")
    spec = MergeSpec(adapters=(AdapterRef(f"s3://{PUBLIC_BUCKET}/merge/moving"), AdapterRef("b")))
    before = merger.plan(spec)
    assert merger.plan(spec).merge_key == before.merge_key  # nothing changed: same key
    s3_server.client().upload_file(
        str(adapter_root / "e" / WEIGHTS_FILE), PUBLIC_BUCKET, f"merge/moving/{WEIGHTS_FILE}"
    )
    after = merger.plan(spec)
    assert after.merge_key != before.merge_key
    assert after.sources[0].revision != before.sources[0].revision
    # With the config replaced too, the adapter is e's: the key and bytes of merging e from disk.
    s3_server.upload_adapter(adapter_root / "e", PUBLIC_BUCKET, "merge/moving")
    now_e = merger.plan(spec)
    local_e = merger.plan(MergeSpec(adapters=(AdapterRef("e"), AdapterRef("b"))))
    assert now_e.merge_key == local_e.merge_key != after.merge_key
    assert merger.build(now_e).data == merger.build(local_e).data
