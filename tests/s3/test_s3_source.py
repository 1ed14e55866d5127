"""The s3 adapter source against a real S3 protocol server (moto, IAM enforced) on loopback."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import pytest

from loramerge.errors import (
    FailedPrecondition,
    InvalidArgument,
    LoramergeError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from loramerge.peft import CONFIG_FILE, WEIGHTS_FILE
from merge_service.sources.local import LocalSource
from merge_service.sources.s3 import META_FILE, S3Settings, S3Source, parse_s3_uri, redact_url
from merge_service.spec import AdapterRef, SourceKind
from tests.factories import make_adapter
from tests.s3.conftest import PRIVATE_BUCKET, PUBLIC_BUCKET, REGION, VERSIONED_BUCKET, Keys, S3Server


def _source(server: S3Server, cache: Path, keys: Keys | None = None, **overrides) -> S3Source:
    settings = S3Settings(
        endpoint_url=server.endpoint_url, region=REGION, cache_dir=cache, max_attempts=1, **overrides
    )
    return S3Source(settings, session=(keys or server.reader).session())


def _record_calls(source: S3Source) -> list[str]:
    calls: list[str] = []
    source._client().meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    return calls


def _same_files(a: Path, b: Path) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in (CONFIG_FILE, WEIGHTS_FILE))


@pytest.fixture(scope="module")
def uploaded(s3_server: S3Server, adapter_root: Path) -> dict[str, str]:
    """Adapters a and b in the public bucket, a in the private one."""
    s3_server.upload_adapter(adapter_root / "a", PUBLIC_BUCKET, "team/a")
    s3_server.upload_adapter(adapter_root / "b", PUBLIC_BUCKET, "team/b")
    s3_server.upload_adapter(adapter_root / "a", PRIVATE_BUCKET, "secret/a")
    return {"a": f"s3://{PUBLIC_BUCKET}/team/a", "b": f"s3://{PUBLIC_BUCKET}/team/b"}


def test_parse_s3_uri() -> None:
    loc = parse_s3_uri("s3://my-bucket/some/prefix/")
    assert (loc.bucket, loc.prefix, loc.uri) == ("my-bucket", "some/prefix", "s3://my-bucket/some/prefix")
    assert loc.object_uri(CONFIG_FILE) == "s3://my-bucket/some/prefix/adapter_config.json"
    assert parse_s3_uri("s3://bucket").key(WEIGHTS_FILE) == WEIGHTS_FILE
    for bad in ("s3://", "s3://Upper/x", "s3://a/x", "s3://bucket/a//b", "s3://bucket/../x", "http://b/x"):
        with pytest.raises(InvalidArgument) as err:
            parse_s3_uri(bad)
        assert repr(bad) in err.value.message or "bucket" in err.value.message


def test_redact_url_drops_userinfo() -> None:
    assert redact_url("https://user:s3cr3t@minio.local:9000/") == "https://minio.local:9000/"
    assert "s3cr3t" not in redact_url("http://AKIA:s3cr3t@127.0.0.1:9000")


def test_resolve_downloads_the_two_files(
    s3_server: S3Server, uploaded: dict[str, str], adapter_root: Path, tmp_path: Path
) -> None:
    source = _source(s3_server, tmp_path / "cache")
    # Noise beside the adapter is never read.
    s3_server.client().put_object(Bucket=PUBLIC_BUCKET, Key="team/a/README.md", Body=b"ignore me")
    calls = _record_calls(source)
    resolved = source.resolve(AdapterRef(uploaded["a"] + "/"))
    assert resolved.kind is SourceKind.S3
    assert resolved.id == uploaded["a"]
    assert _same_files(resolved.path, adapter_root / "a")
    assert sorted(p.name for p in resolved.path.iterdir() if not p.name.startswith(".")) == [
        CONFIG_FILE,
        WEIGHTS_FILE,
    ]
    assert calls == ["HeadObject", "HeadObject", "GetObject", "GetObject"]
    # The digest is the content's: the same as the local source gives for the same two files.
    assert resolved.digest == LocalSource(adapter_root).resolve(AdapterRef("a")).digest
    assert resolved.nbytes == sum(
        (adapter_root / "a" / n).stat().st_size for n in (CONFIG_FILE, WEIGHTS_FILE)
    )
    # Unversioned bucket: the revision is the two ETags (S3's MD5 of single-part uploads).
    head = s3_server.client().head_object(Bucket=PUBLIC_BUCKET, Key=f"team/a/{WEIGHTS_FILE}")
    assert resolved.revision.split(",")[1] == head["ETag"].strip('"')

    # Cached: resolving again costs two HEAD requests and nothing else, and gives the same answer.
    calls.clear()
    again = source.resolve(AdapterRef(uploaded["a"]))
    assert calls == ["HeadObject", "HeadObject"]
    assert again == resolved
    # A second source instance (a restarted service) finds the same cache directory.
    other = _source(s3_server, tmp_path / "cache")
    other_calls = _record_calls(other)
    assert other.resolve(AdapterRef(uploaded["a"])).path == resolved.path
    assert other_calls == ["HeadObject", "HeadObject"]
    # A damaged entry (its metadata lost) is downloaded again, not trusted.
    (resolved.path / META_FILE).unlink()
    other_calls.clear()
    assert other.resolve(AdapterRef(uploaded["a"])) == resolved
    assert other_calls == ["HeadObject", "HeadObject", "GetObject", "GetObject"]


def test_digest_follows_content(s3_server: S3Server, adapter_root: Path, tmp_path: Path) -> None:
    source = _source(s3_server, tmp_path / "cache", keys=s3_server.admin)
    s3_server.upload_adapter(adapter_root / "a", PUBLIC_BUCKET, "moving/x")
    ref = AdapterRef(f"s3://{PUBLIC_BUCKET}/moving/x")
    first = source.resolve(ref)
    # Re-uploading identical bytes: same ETags, same digest, same cache entry.
    s3_server.upload_adapter(adapter_root / "a", PUBLIC_BUCKET, "moving/x")
    assert source.resolve(ref) == first
    # New weights under the same key: a new digest and the new bytes.
    s3_server.client().upload_file(
        str(adapter_root / "e" / WEIGHTS_FILE), PUBLIC_BUCKET, f"moving/x/{WEIGHTS_FILE}"
    )
    second = source.resolve(ref)
    assert second.digest != first.digest and second.revision != first.revision
    assert (second.path / WEIGHTS_FILE).read_bytes() == (adapter_root / "e" / WEIGHTS_FILE).read_bytes()
    # A changed config alone changes it too.
    cfg = (adapter_root / "a" / CONFIG_FILE).read_text().replace('"lora_alpha": 16', '"lora_alpha": 17')
    s3_server.client().put_object(Bucket=PUBLIC_BUCKET, Key=f"moving/x/{CONFIG_FILE}", Body=cfg.encode())
    assert source.resolve(ref).digest not in (first.digest, second.digest)


def test_versioned_bucket_reports_and_pins_versions(
    s3_server: S3Server, adapter_root: Path, tmp_path: Path
) -> None:
    admin = s3_server.client()
    s3_server.upload_adapter(adapter_root / "a", VERSIONED_BUCKET, "v")
    source = _source(s3_server, tmp_path / "cache")
    ref = AdapterRef(f"s3://{VERSIONED_BUCKET}/v")
    old = source.resolve(ref)
    head = admin.head_object(Bucket=VERSIONED_BUCKET, Key=f"v/{WEIGHTS_FILE}")
    assert old.revision.split(",")[1] == head["VersionId"]

    admin.upload_file(str(adapter_root / "e" / WEIGHTS_FILE), VERSIONED_BUCKET, f"v/{WEIGHTS_FILE}")
    new = source.resolve(ref)
    assert new.digest != old.digest
    assert (new.path / WEIGHTS_FILE).read_bytes() == (adapter_root / "e" / WEIGHTS_FILE).read_bytes()

    # Pinning the old revision fetches the old versions, into a fresh cache too.
    fresh = _source(s3_server, tmp_path / "cache2")
    pinned = fresh.resolve(AdapterRef(ref.id, revision=old.revision))
    assert (pinned.digest, pinned.revision) == (old.digest, old.revision)
    assert _same_files(pinned.path, adapter_root / "a")

    with pytest.raises(NotFound) as err:
        fresh.resolve(AdapterRef(ref.id, revision=old.revision.split(",")[0] + ",nosuchversion"))
    assert "nosuchversion" in err.value.message and err.value.field == "adapter"


def test_pinning_an_unversioned_bucket(s3_server: S3Server, uploaded: dict[str, str], tmp_path: Path) -> None:
    source = _source(s3_server, tmp_path / "cache")
    current = source.resolve(AdapterRef(uploaded["b"]))
    assert source.resolve(AdapterRef(uploaded["b"], revision=current.revision)) == current
    with pytest.raises(NotFound) as err:
        source.resolve(AdapterRef(uploaded["b"], revision="0123,4567"))
    assert "'0123,4567'" in err.value.message and current.revision in err.value.message
    with pytest.raises(InvalidArgument):
        source.resolve(AdapterRef(uploaded["b"], revision="just-one-part"))


def _assert_clean(err: LoramergeError, *secrets: str) -> None:
    text = f"{err.message} {err.violations} {err!r}"
    for secret in secrets:
        assert secret not in text


def test_missing_bucket_and_missing_key(
    s3_server: S3Server, uploaded: dict[str, str], tmp_path: Path
) -> None:
    source = _source(s3_server, tmp_path / "cache", keys=s3_server.admin)
    with pytest.raises(NotFound) as err:
        source.resolve(AdapterRef("s3://no-such-bucket/x"))
    assert "'no-such-bucket'" in err.value.message and "does not exist" in err.value.message
    with pytest.raises(NotFound) as err:
        source.resolve(AdapterRef(f"s3://{PUBLIC_BUCKET}/team/nothing-here"))
    assert f"s3://{PUBLIC_BUCKET}/team/nothing-here/{CONFIG_FILE}" in err.value.message
    assert err.value.field == "adapter"
    _assert_clean(err.value, s3_server.admin.secret_access_key, s3_server.admin.access_key_id)


def test_partial_adapter_leaves_no_cache_entry(
    s3_server: S3Server, adapter_root: Path, tmp_path: Path
) -> None:
    """Config present, weights missing: NOT_FOUND naming the weights object, nothing cached."""
    s3_server.client().upload_file(
        str(adapter_root / "a" / CONFIG_FILE), PUBLIC_BUCKET, f"half/{CONFIG_FILE}"
    )
    source = _source(s3_server, tmp_path / "cache")
    with pytest.raises(NotFound) as err:
        source.resolve(AdapterRef(f"s3://{PUBLIC_BUCKET}/half"))
    assert f"half/{WEIGHTS_FILE}" in err.value.message
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_access_denied(s3_server: S3Server, uploaded: dict[str, str], tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    source = _source(s3_server, tmp_path / "cache", keys=s3_server.reader)
    with pytest.raises(PermissionDenied) as err:
        source.resolve(AdapterRef(f"s3://{PRIVATE_BUCKET}/secret/a"))
    assert f"s3://{PRIVATE_BUCKET}/secret/a/{CONFIG_FILE}" in err.value.message
    assert "denied" in err.value.message
    _assert_clean(err.value, s3_server.reader.secret_access_key, s3_server.reader.access_key_id)
    assert s3_server.reader.secret_access_key not in caplog.text
    # The admin may read it: the denial comes from the policy, not from a missing object.
    assert (
        _source(s3_server, tmp_path / "c2", keys=s3_server.admin)
        .resolve(AdapterRef(f"s3://{PRIVATE_BUCKET}/secret/a"))
        .path.is_dir()
    )


def test_rejected_credentials(s3_server: S3Server, uploaded: dict[str, str], tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    wrong_secret = "wr0ngSecretKeyThatMustNeverBeShown000000"
    for keys in (
        Keys(s3_server.reader.access_key_id, wrong_secret),
        Keys("AKIANOSUCHKEY0000000", wrong_secret),
    ):
        source = _source(s3_server, tmp_path / "cache", keys=keys)
        with pytest.raises(FailedPrecondition) as err:
            source.resolve(AdapterRef(uploaded["a"]))
        assert "rejected the merge service's AWS credentials" in err.value.message
        assert "AWS_ACCESS_KEY_ID" in err.value.message
        _assert_clean(err.value, wrong_secret, keys.access_key_id)
    assert wrong_secret not in caplog.text


@pytest.mark.usefixtures("no_aws_environment")
def test_no_credentials(s3_server: S3Server, uploaded: dict[str, str], tmp_path: Path) -> None:
    settings = S3Settings(endpoint_url=s3_server.endpoint_url, region=REGION, cache_dir=tmp_path / "c")
    with pytest.raises(FailedPrecondition) as err:
        S3Source(settings).resolve(AdapterRef(uploaded["a"]))
    message = err.value.message
    assert "no AWS credentials" in message and uploaded["a"] in message
    for how in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "role"):
        assert how in message


def test_environment_credentials_are_used(
    s3_server: S3Server, uploaded: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no session given, the standard chain (here: environment variables) supplies the keys."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.reader.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.reader.secret_access_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)  # boto3's own endpoint variable
    source = S3Source(S3Settings(region=REGION, cache_dir=tmp_path / "c"))
    assert source.resolve(AdapterRef(uploaded["b"])).path.is_dir()


def test_unreachable_endpoint(uploaded: dict[str, str], s3_server: S3Server, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = S3Settings(
        endpoint_url=f"http://user:pa55word@127.0.0.1:{port}",
        region=REGION,
        cache_dir=tmp_path / "c",
        max_attempts=1,
        connect_timeout_s=2,
    )
    started = time.monotonic()
    with pytest.raises(Unavailable) as err:
        S3Source(settings, session=s3_server.reader.session()).resolve(AdapterRef(uploaded["a"]))
    assert time.monotonic() - started < 30
    assert f"http://127.0.0.1:{port}" in err.value.message and "unreachable" in err.value.message
    _assert_clean(err.value, "pa55word", s3_server.reader.secret_access_key)


def test_cache_is_bounded_lru(
    s3_server: S3Server, uploaded: dict[str, str], adapter_root: Path, tmp_path: Path
) -> None:
    size_a = sum((adapter_root / "a" / n).stat().st_size for n in (CONFIG_FILE, WEIGHTS_FILE))
    size_b = sum((adapter_root / "b" / n).stat().st_size for n in (CONFIG_FILE, WEIGHTS_FILE))
    s3_server.upload_adapter(adapter_root / "a", PUBLIC_BUCKET, "lru/a2")  # same bytes, another prefix
    assert size_b > 4096 and size_a >= size_b
    cap = 2 * size_a + 4096  # room for two adapters (plus small metadata), not for a third
    source = _source(s3_server, tmp_path / "cache", cache_bytes=cap, min_entry_age_s=0)
    ra = source.resolve(AdapterRef(uploaded["a"]))
    os.utime(ra.path, (time.time() - 100, time.time() - 100))
    rb = source.resolve(AdapterRef(uploaded["b"]))
    os.utime(rb.path, (time.time() - 50, time.time() - 50))
    source.resolve(AdapterRef(uploaded["a"]))  # a hit refreshes a: b is now the least recently used
    ra2 = source.resolve(AdapterRef(f"s3://{PUBLIC_BUCKET}/lru/a2"))
    assert ra2.path.is_dir() and ra.path.is_dir() and not rb.path.exists()
    assert source.cache.total_bytes() <= cap
    # b comes back on demand.
    assert _same_files(source.resolve(AdapterRef(uploaded["b"])).path, adapter_root / "b")
    assert source.cache.total_bytes() <= cap


def test_adapter_larger_than_the_cache(s3_server: S3Server, uploaded: dict[str, str], tmp_path: Path) -> None:
    source = _source(s3_server, tmp_path / "cache", cache_bytes=1024)
    with pytest.raises(ResourceExhausted) as err:
        source.resolve(AdapterRef(uploaded["a"]))
    assert "1024" in err.value.message and uploaded["a"] in err.value.message


def test_other_adapter_files_in_a_fresh_tree(s3_server: S3Server, tmp_path: Path, tiny_llama: Path) -> None:
    """An adapter with rank/alpha patterns round-trips byte for byte (nothing is re-serialised)."""
    src = make_adapter(tmp_path / "pat", tiny_llama, r=4, alpha=8, rank_pattern={"q_proj": 2}, seed=9)
    s3_server.upload_adapter(src, PUBLIC_BUCKET, "deep/nested/prefix/pat")
    resolved = _source(s3_server, tmp_path / "cache").resolve(
        AdapterRef(f"s3://{PUBLIC_BUCKET}/deep/nested/prefix/pat")
    )
    assert _same_files(resolved.path, src)


def test_concurrent_resolves_share_one_entry(
    s3_server: S3Server, uploaded: dict[str, str], tmp_path: Path
) -> None:
    """Racing first downloads of one version end in one complete entry and no staging leftovers."""
    from concurrent.futures import ThreadPoolExecutor

    source = _source(s3_server, tmp_path / "cache")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: source.resolve(AdapterRef(uploaded["b"])), range(4)))
    assert len({r.path for r in results}) == 1 and len({r.digest for r in results}) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [results[0].path.name]
