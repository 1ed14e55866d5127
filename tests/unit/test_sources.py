"""Adapter sources: AUTO dispatch, local paths and digests, and the hub through huggingface_hub.

The hub is exercised with no network in two ways: a cache directory laid out by hand the way
huggingface_hub documents it (offline mode), and a small HTTP server on loopback that answers the
requests huggingface_hub makes (HEAD/GET on /<repo>/resolve/<revision>/<file>, with the Hub's
X-Repo-Commit / X-Error-Code headers), so the real client code runs against it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import types
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub.constants
import pytest

from loramerge.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from loramerge.peft import CONFIG_FILE, WEIGHTS_FILE
from merge_service.adapter import load_adapter
from merge_service.sources import SourceResolver
from merge_service.sources.base import PICKLED_WEIGHTS_FILE, ResolvedSource
from merge_service.sources.hub import HubSource, parse_hub_id
from merge_service.sources.local import LocalSource
from merge_service.spec import AdapterRef, SourceKind

COMMIT_1 = "1" * 40
COMMIT_2 = "2" * 40


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------ local


@pytest.fixture
def root(tmp_path: Path, adapter_root: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    shutil.copytree(adapter_root / "a", r / "a")
    shutil.copytree(adapter_root / "b", r / "team" / "b")
    return r


def test_local_digest_is_sha256_of_both_files(root: Path) -> None:
    resolved = SourceResolver(root).resolve(AdapterRef("team/b"))
    assert resolved.kind == SourceKind.LOCAL and resolved.revision == ""
    assert resolved.path == (root / "team" / "b").resolve()
    cfg, w = (root / "team/b" / CONFIG_FILE).read_bytes(), (root / "team/b" / WEIGHTS_FILE).read_bytes()
    expected = _sha(f"{CONFIG_FILE} {_sha(cfg)}\n{WEIGHTS_FILE} {_sha(w)}\n".encode())
    assert resolved.digest == "sha256:" + expected
    assert resolved.nbytes == len(cfg) + len(w)
    assert load_adapter(resolved).digest == resolved.digest


def test_local_digest_follows_content_not_name(root: Path) -> None:
    shutil.copytree(root / "a", root / "a-copy")
    resolver = SourceResolver(root)
    a, copy = resolver.resolve(AdapterRef("a")), resolver.resolve(AdapterRef("a-copy"))
    assert a.digest == copy.digest
    w = root / "a-copy" / WEIGHTS_FILE
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    assert resolver.resolve(AdapterRef("a-copy")).digest != a.digest


def test_local_digest_cache_skips_unchanged_files(root: Path) -> None:
    source = LocalSource(root)
    first = source.resolve(AdapterRef("a"))
    read = source.digests.hashed_bytes
    assert read == first.nbytes
    assert source.resolve(AdapterRef("a")).digest == first.digest
    assert source.digests.hashed_bytes == read  # nothing reread
    cfg = root / "a" / CONFIG_FILE
    cfg.write_text(cfg.read_text().replace('"r": 8', '"r": 8 '))
    changed = source.resolve(AdapterRef("a"))
    assert changed.digest != first.digest
    assert source.digests.hashed_bytes == read + cfg.stat().st_size  # only the changed file


def test_local_errors_name_the_field(root: Path) -> None:
    resolver = SourceResolver(root)
    with pytest.raises(NotFound) as info:
        resolver.resolve(AdapterRef("team/missing", source=SourceKind.LOCAL), field="spec.adapters[2].id")
    assert info.value.field == "spec.adapters[2].id" and "'team/missing'" in info.value.message
    with pytest.raises(InvalidArgument, match="revision"):
        resolver.resolve(AdapterRef("a", revision="main"))
    (root / "empty").mkdir()
    with pytest.raises(NotFound, match=r"'empty'.*adapter_config\.json"):
        resolver.resolve(AdapterRef("empty"))
    with pytest.raises(InvalidArgument, match="empty"):
        resolver.resolve(AdapterRef(""))


def test_local_needs_a_root() -> None:
    with pytest.raises(FailedPrecondition, match="no adapter root"):
        SourceResolver(None).resolve(AdapterRef("a", source=SourceKind.LOCAL))


# ------------------------------------------------------------------------------------- dispatch


@dataclass
class FakeS3:
    path: Path
    kind: SourceKind = SourceKind.S3
    seen: list[AdapterRef] = field(default_factory=list)

    def resolve(self, ref: AdapterRef) -> ResolvedSource:
        self.seen.append(ref)
        return ResolvedSource(ref.id, SourceKind.S3, "etag-1", "s3:etag-1", self.path)


def test_auto_detection(root: Path, tmp_path: Path) -> None:
    resolver = SourceResolver(root)
    assert resolver.detect(AdapterRef("a")) == SourceKind.LOCAL
    assert resolver.detect(AdapterRef("team/b")) == SourceKind.LOCAL
    assert resolver.detect(AdapterRef("org/name")) == SourceKind.HUB
    assert resolver.detect(AdapterRef("s3://bucket/a")) == SourceKind.S3
    # Ids that can only be paths go to LOCAL, which refuses them as paths.
    assert resolver.detect(AdapterRef("../a")) == SourceKind.LOCAL
    assert resolver.detect(AdapterRef("/etc")) == SourceKind.LOCAL
    assert resolver.detect(AdapterRef("a", source=SourceKind.HUB)) == SourceKind.HUB
    assert SourceResolver(None).detect(AdapterRef("a")) == SourceKind.HUB


def test_s3_is_one_registration(root: Path, adapter_root: Path) -> None:
    resolver = SourceResolver(root, max_adapter_bytes=10**9)
    with pytest.raises(FailedPrecondition, match="s3 adapters cannot be used") as info:
        resolver.resolve(AdapterRef("s3://bucket/a"), field="spec.adapters[0].id")
    assert info.value.field == "spec.adapters[0].id"
    s3 = FakeS3(adapter_root / "a")
    resolver.register(s3)
    resolved = resolver.resolve(AdapterRef("s3://bucket/a"))
    assert resolved.digest == "s3:etag-1" and s3.seen == [AdapterRef("s3://bucket/a")]
    assert resolved.nbytes == sum(
        (adapter_root / "a" / n).stat().st_size for n in (CONFIG_FILE, WEIGHTS_FILE)
    )
    # The byte limit applies to every source, registered ones included.
    small = SourceResolver(root, max_adapter_bytes=1000)
    small.register(s3)
    with pytest.raises(ResourceExhausted, match="max_adapter_bytes"):
        small.resolve(AdapterRef("s3://bucket/a"))


# ------------------------------------------------------------------------------ hub: offline cache


def _cache_put(cache: Path, repo: str, commit: str, files: dict[str, bytes], refs: dict[str, str]) -> Path:
    """Lay out huggingface_hub's cache: blobs/<sha>, snapshots/<commit>/<file> → blob, refs/<name>."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo_dir / "blobs" / _sha(data)
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    for ref, target in refs.items():
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(target)
    return snap


def _files(adapter: Path) -> dict[str, bytes]:
    return {n: (adapter / n).read_bytes() for n in (CONFIG_FILE, WEIGHTS_FILE)}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub_cache(tmp_path: Path, adapter_root: Path) -> Path:
    cache = tmp_path / "hub"
    _cache_put(cache, "org/name", COMMIT_1, _files(adapter_root / "a"), {"main": COMMIT_1})
    _cache_put(cache, "org/name", COMMIT_2, _files(adapter_root / "b"), {"v2": COMMIT_2})
    pickled = {CONFIG_FILE: _files(adapter_root / "a")[CONFIG_FILE], PICKLED_WEIGHTS_FILE: b"\x80\x04N."}
    _cache_put(cache, "org/pickled", COMMIT_1, pickled, {"main": COMMIT_1})
    return cache


def _pinned(r: ResolvedSource) -> tuple:
    return (r.kind, r.revision, r.digest, r.path, r.nbytes)


@pytest.mark.usefixtures("offline")
def test_hub_offline_resolves_branches_tags_and_commits(hub_cache: Path, adapter_root: Path) -> None:
    resolver = SourceResolver(None, hub_cache_dir=hub_cache)
    main = resolver.resolve(AdapterRef("org/name"))
    assert main.kind == SourceKind.HUB and main.revision == COMMIT_1
    assert main.digest == f"hub:org/name@{COMMIT_1}"
    assert main.path == hub_cache / "models--org--name" / "snapshots" / COMMIT_1
    assert _pinned(resolver.resolve(AdapterRef("org/name@main"))) == _pinned(main)
    assert resolver.resolve(AdapterRef("org/name", revision=COMMIT_1)) == main
    v2 = resolver.resolve(AdapterRef("org/name@v2"))
    assert v2.revision == COMMIT_2 and v2.digest == f"hub:org/name@{COMMIT_2}"
    assert _pinned(resolver.resolve(AdapterRef(f"org/name@{COMMIT_2}"))) == _pinned(v2)
    # The files are real: they load, and they are adapter b's.
    assert load_adapter(v2).config.r == 4 and load_adapter(main).config.r == 8


@pytest.mark.usefixtures("offline")
def test_hub_offline_not_cached_is_failed_precondition(hub_cache: Path) -> None:
    resolver = SourceResolver(None, hub_cache_dir=hub_cache)
    for ref in (AdapterRef("org/other"), AdapterRef("org/name@dev"), AdapterRef(f"org/name@{'3' * 40}")):
        with pytest.raises(FailedPrecondition, match="offline") as info:
            resolver.resolve(ref, field="spec.adapters[0].id")
        assert repr(ref.id) in info.value.message and info.value.field == "spec.adapters[0].id"


@pytest.mark.usefixtures("offline")
def test_hub_pickled_only_is_refused_unopened(hub_cache: Path) -> None:
    with pytest.raises(FailedPrecondition, match=r"'org/pickled'.*adapter_model\.bin.*never loaded"):
        SourceResolver(None, hub_cache_dir=hub_cache).resolve(AdapterRef("org/pickled"))


@pytest.mark.usefixtures("offline")
def test_hub_byte_limit_offline(hub_cache: Path) -> None:
    with pytest.raises(ResourceExhausted, match="'org/name'"):
        SourceResolver(None, hub_cache_dir=hub_cache, max_adapter_bytes=1000).resolve(AdapterRef("org/name"))


@pytest.mark.parametrize(
    ("adapter_id", "revision", "expected"),
    [
        ("org/name", "", ("org/name", None)),
        ("org/name@main", "", ("org/name", "main")),
        ("org/name", "v1", ("org/name", "v1")),
        ("org/name@v1", "v1", ("org/name", "v1")),
        ("gpt2", "", ("gpt2", None)),
    ],
)
def test_parse_hub_id(adapter_id: str, revision: str, expected: tuple) -> None:
    assert parse_hub_id(adapter_id, revision) == expected


@pytest.mark.parametrize(
    ("adapter_id", "revision"), [("org/name@v1", "v2"), ("org/name@", ""), ("a/b/c", ""), ("org/na--me", "")]
)
def test_parse_hub_id_rejects(adapter_id: str, revision: str) -> None:
    with pytest.raises(InvalidArgument, match=repr(adapter_id).replace("$", r"\$")):
        parse_hub_id(adapter_id, revision)


# ---------------------------------------------------------------------------- hub: loopback server


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]]
    refs: dict[str, str]
    gated: bool = False
    token: str | None = None  # required bearer token, when set


class FakeHub(ThreadingHTTPServer):
    """Answers /<org>/<name>/resolve/<revision>/<file> like the Hub, with X-Error-Code on failure."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
        self.server.requests.append((self.command, path))
        parts = path.strip("/").split("/")
        if len(parts) != 5 or parts[2] != "resolve":
            return self._error(404, "RepoNotFound")
        repo_id, revision, filename = f"{parts[0]}/{parts[1]}", parts[3], parts[4]
        repo = self.server.repos.get(repo_id)
        if repo is None:
            return self._error(401, "RepoNotFound")  # as the Hub does for private or missing repos
        if repo.gated and self.headers.get("authorization") != f"Bearer {repo.token}":
            return self._error(403, "GatedRepo")
        commit = repo.refs.get(revision, revision)
        if commit not in repo.commits:
            return self._error(404, "RevisionNotFound")
        files = repo.commits[commit]
        if filename not in files:
            return self._error(404, "EntryNotFound", commit)
        data = files[filename]
        self.send_response(200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{_sha(data)}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str, commit: str | None = None) -> None:
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)


@pytest.fixture
def fake_hub(adapter_root: Path) -> Iterator[FakeHub]:
    hub = FakeHub()
    a, b = _files(adapter_root / "a"), _files(adapter_root / "b")
    hub.repos["org/name"] = Repo({COMMIT_1: a, COMMIT_2: b}, {"main": COMMIT_1, "v2": COMMIT_2})
    hub.repos["org/gated"] = Repo({COMMIT_1: a}, {"main": COMMIT_1}, gated=True, token="hf_secret")
    hub.repos["org/pickled"] = Repo(
        {COMMIT_1: {CONFIG_FILE: a[CONFIG_FILE], PICKLED_WEIGHTS_FILE: b"\x80\x04N."}}, {"main": COMMIT_1}
    )
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    yield hub
    hub.shutdown()
    hub.server_close()


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.mark.usefixtures("online")
def test_hub_download_fetches_exactly_two_files(fake_hub: FakeHub, tmp_path: Path) -> None:
    resolver = SourceResolver(None, hub_cache_dir=tmp_path / "cache", hub_endpoint=fake_hub.url)
    v2 = resolver.resolve(AdapterRef("org/name@v2"))
    assert v2.revision == COMMIT_2 and v2.digest == f"hub:org/name@{COMMIT_2}"
    assert load_adapter(v2).config.r == 4
    fetched = [p for m, p in fake_hub.requests if m == "GET"]
    assert sorted(p.rsplit("/", 1)[1] for p in fetched) == [CONFIG_FILE, WEIGHTS_FILE]
    # The weights are pinned to the commit the config came from.
    assert all(
        p.startswith(f"/org/name/resolve/{COMMIT_2}/") for m, p in fake_hub.requests if WEIGHTS_FILE in p
    )
    # Later, offline, the cache's refs answer for the branch.
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    n = len(fake_hub.requests)
    assert resolver.resolve(AdapterRef("org/name@v2")) == v2
    assert len(fake_hub.requests) == n


@pytest.mark.usefixtures("online")
def test_hub_byte_limit_is_checked_before_downloading(fake_hub: FakeHub, tmp_path: Path) -> None:
    resolver = SourceResolver(
        None, hub_cache_dir=tmp_path / "cache", hub_endpoint=fake_hub.url, max_adapter_bytes=2000
    )
    with pytest.raises(ResourceExhausted, match="max_adapter_bytes"):
        resolver.resolve(AdapterRef("org/name"))
    assert not [p for m, p in fake_hub.requests if m == "GET" and p.endswith(WEIGHTS_FILE)]
    assert not list((tmp_path / "cache").rglob(WEIGHTS_FILE))


@pytest.mark.usefixtures("online")
def test_hub_errors_map_to_status_codes(fake_hub: FakeHub, tmp_path: Path) -> None:
    def resolver(token: str | None = None) -> SourceResolver:
        return SourceResolver(
            None, hub_token=token, hub_cache_dir=tmp_path / "cache", hub_endpoint=fake_hub.url
        )

    with pytest.raises(NotFound, match="no such hub repo"):
        resolver().resolve(AdapterRef("org/missing"))
    with pytest.raises(NotFound, match="no such revision"):
        resolver().resolve(AdapterRef("org/name@nope"))
    with pytest.raises(PermissionDenied, match="gated") as info:
        resolver("hf_wrong").resolve(AdapterRef("org/gated"))
    assert "hf_wrong" not in info.value.message
    assert resolver("hf_secret").resolve(AdapterRef("org/gated")).revision == COMMIT_1
    with pytest.raises(FailedPrecondition, match=r"adapter_model\.bin"):
        resolver().resolve(AdapterRef("org/pickled"))
    assert not [p for m, p in fake_hub.requests if m == "GET" and p.endswith(PICKLED_WEIGHTS_FILE)]


@pytest.mark.usefixtures("online")
def test_hub_unreachable_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub retries with backoff (about 23 s in all) before giving up; skip the waiting.
    import huggingface_hub.utils._http as hf_http

    sleeps: list[float] = []
    monkeypatch.setattr(hf_http, "time", types.SimpleNamespace(sleep=sleeps.append))
    hub = FakeHub()  # bound, then closed: connections are refused
    url = hub.url
    hub.server_close()
    source = HubSource(cache_dir=tmp_path / "cache", endpoint=url)
    with pytest.raises(Unavailable, match="cannot reach the hub"):
        source.resolve(AdapterRef("org/name"))
    assert sleeps  # it did retry


@pytest.mark.usefixtures("offline")
def test_hub_default_cache_is_huggingface_hubs(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no cache dir configured, the one HF_HOME / HF_HUB_CACHE point at is used."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    assert SourceResolver(None).resolve(AdapterRef("org/name")).path.is_relative_to(hub_cache)
