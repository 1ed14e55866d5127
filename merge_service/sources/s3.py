"""Adapters stored in S3 or an S3-compatible object store (MinIO, Ceph RGW, Cloudflare R2).

An adapter id ``s3://bucket/prefix`` names the two objects ``prefix/adapter_config.json`` and
``prefix/adapter_model.safetensors``; nothing else under the prefix is read. Credentials come from
boto3's standard chain (environment, shared config/credentials files and profiles, web identity /
pod role, instance role), read by boto3 alone: no message or log line of ours carries them.

Identity: the content digest is the local source's (sha256 over both files' sha256), so the same
bytes give the same merge key whether they come from S3 or from disk, and overwriting an object with
new bytes changes it while re-reading it does not. The objects' ETags name the downloaded version:
the download cache holds one directory per (bucket, keys, ETags) with the digest computed while
downloading, so resolving an adapter the cache holds costs two HEAD requests and no GET. The revision
reported to callers is the objects' version ids when the bucket is versioned (else their ETags); a
request may pin that revision, which fetches those exact versions from a versioned bucket and fails
with NOT_FOUND when an unversioned object has moved on.

The cache directory is bounded in bytes: least recently used entries (by directory mtime, touched on
every hit) are deleted, except those used in the last ``min_entry_age_s`` (a merge may be about to
read them). Entries are written under a temporary name and renamed into place, so a failed or
interrupted download leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from loramerge.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LoramergeError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    shown,
)
from merge_service.sources.base import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ResolvedSource,
    check_size,
    content_digest,
)
from merge_service.spec import AdapterRef, SourceKind

log = logging.getLogger(__name__)

SCHEME = "s3://"
FIELD = "adapter"  # SourceResolver re-attributes errors to the request field that named the adapter
GiB = 1024**3
MAX_CONFIG_BYTES = 1024**2
_CHUNK = 1024**2
META_FILE = ".s3-meta.json"  # where an entry came from, and its content digest
_TMP_PREFIX = ".tmp-"
_STALE_STAGING_S = 3600.0
# S3 bucket naming rules (3-63 chars, lower case, digits, dots, hyphens; starts/ends alphanumeric).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

NO_CREDENTIALS_HELP = (
    "provide them the way any AWS SDK finds them: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
    "(plus AWS_SESSION_TOKEN for temporary ones) in the environment, AWS_PROFILE naming a profile in "
    "~/.aws/credentials or ~/.aws/config, a web-identity/pod role (AWS_ROLE_ARN with "
    "AWS_WEB_IDENTITY_TOKEN_FILE, e.g. EKS IRSA), or an EC2/ECS instance role"
)
# Error codes meaning the credentials themselves were refused (as opposed to lacking a permission).
_BAD_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
        "AuthorizationHeaderMalformed",
    }
)
_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem", "403", "Forbidden"})
_UNAVAILABLE_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500", "502", "504"}
)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/loramerge/s3, else ~/.cache/loramerge/s3."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loramerge" / "s3"


@dataclass(frozen=True)
class S3Settings:
    """How the S3 source reaches the store and where it keeps downloads.

    ``endpoint_url``/``region`` of None leave the choice to boto3 (``AWS_ENDPOINT_URL_S3``,
    ``AWS_REGION``, the profile, then AWS defaults).
    """

    endpoint_url: str | None = None
    region: str | None = None
    # A per-user directory, not a shared temp one: whoever can write the cache chooses the adapters.
    cache_dir: Path = field(default_factory=default_cache_dir)
    cache_bytes: int = 10 * GiB
    addressing_style: str = "auto"  # auto | path | virtual; MinIO and Ceph usually want "path"
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    max_attempts: int = 3
    # Entries used this recently are never evicted: a merge may be about to read them.
    min_entry_age_s: float = 300.0


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading or trailing slash; "" for the bucket root

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def object_uri(self, name: str) -> str:
        return f"{SCHEME}{self.bucket}/{self.key(name)}"


@dataclass(frozen=True)
class ObjectVersion:
    """What a HEAD request says about one object."""

    key: str
    etag: str  # without the surrounding quotes
    version_id: str | None  # None when the bucket is not versioned
    size: int

    @property
    def tag(self) -> str:
        return self.version_id or self.etag


def parse_s3_uri(uri: str) -> S3Location:
    """``s3://bucket/some/prefix/`` -> S3Location("bucket", "some/prefix"); InvalidArgument otherwise."""
    if not uri.startswith(SCHEME):
        raise InvalidArgument(
            f"adapter {shown(uri)}: an S3 adapter id looks like s3://bucket/prefix", field=FIELD
        )
    bucket, _, prefix = uri[len(SCHEME) :].partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise InvalidArgument(
            f"adapter {shown(uri)}: invalid S3 bucket name {shown(bucket)} "
            "(3-63 characters: lower-case letters, digits, dots, hyphens)",
            field=FIELD,
        )
    prefix = prefix.strip("/")
    if "//" in prefix or "\0" in prefix or any(part in (".", "..") for part in prefix.split("/") if prefix):
        raise InvalidArgument(f"adapter {shown(uri)}: invalid S3 key prefix {shown(prefix)}", field=FIELD)
    return S3Location(bucket, prefix)


def version_key(loc: S3Location, config: ObjectVersion, weights: ObjectVersion) -> str:
    """Names one version of an adapter in the download cache: sha256 over bucket, both keys and both
    ETags (NUL separated). ETags follow content, so re-uploading the same bytes keeps the key."""
    h = hashlib.sha256()
    for part in ("s3", loc.bucket, config.key, config.etag, weights.key, weights.etag):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def format_revision(config: ObjectVersion, weights: ObjectVersion) -> str:
    """``<config tag>,<weights tag>``; a tag is the version id, or the ETag when unversioned."""
    return f"{config.tag},{weights.tag}"


def redact_url(url: str | None) -> str:
    """The endpoint URL without any user:password part, for messages."""
    if not url:
        return "the default AWS S3 endpoint"
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class S3Source:
    """The ``s3`` adapter source (see the module docstring)."""

    kind = SourceKind.S3

    def __init__(
        self, settings: S3Settings | None = None, *, max_adapter_bytes: int | None = None, session: Any = None
    ) -> None:
        """``session``: a boto3 Session to take credentials from (default: a new one, i.e. the standard
        chain); ``max_adapter_bytes`` (None or 0: no limit) is checked before anything is downloaded."""
        self.settings = settings or S3Settings()
        self.max_adapter_bytes = max_adapter_bytes
        self._session = session
        self._client_obj: Any = None
        self._client_lock = threading.Lock()
        self.cache = DownloadCache(
            self.settings.cache_dir, self.settings.cache_bytes, min_age_s=self.settings.min_entry_age_s
        )

    # -- the Source protocol ------------------------------------------------------------------
    def resolve(self, ref: AdapterRef) -> ResolvedSource:
        loc = parse_s3_uri(ref.id.strip())
        config, weights = self._head_pair(loc, ref.revision.strip())
        entry = version_key(loc, config, weights)
        hit = self.cache.lookup(entry)
        path, digest = hit if hit else self._download(loc, config, weights, entry)
        return ResolvedSource(
            id=loc.uri,
            kind=SourceKind.S3,
            revision=format_revision(config, weights),
            digest=digest,
            path=path,
            nbytes=config.size + weights.size,
        )

    # -- S3 calls -----------------------------------------------------------------------------
    def _client(self) -> Any:
        with self._client_lock:
            if self._client_obj is None:
                self._client_obj = self._make_client()
            return self._client_obj

    def _make_client(self) -> Any:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:  # pragma: no cover - boto3 is a dependency of the s3 extra
            raise FailedPrecondition(
                "adapters from s3:// need boto3: pip install 'loramerge[s3]'", field=FIELD
            ) from None
        s = self.settings
        config = Config(
            connect_timeout=s.connect_timeout_s,
            read_timeout=s.read_timeout_s,
            retries={"mode": "standard", "max_attempts": s.max_attempts},
            s3={"addressing_style": s.addressing_style},
        )
        session = self._session or boto3.session.Session()
        return session.client("s3", endpoint_url=s.endpoint_url or None, region_name=s.region, config=config)

    def _head(self, loc: S3Location, name: str, version_id: str | None = None) -> ObjectVersion:
        key = loc.key(name)
        kwargs: dict[str, Any] = {"Bucket": loc.bucket, "Key": key}
        if version_id:
            kwargs["VersionId"] = version_id
        try:
            resp = self._client().head_object(**kwargs)
        except Exception as exc:
            raise self._translate(exc, loc, name, version_id) from None
        vid = resp.get("VersionId")
        return ObjectVersion(
            key=key,
            etag=str(resp.get("ETag", "")).strip('"'),
            version_id=vid if vid and vid != "null" else None,
            size=int(resp.get("ContentLength", 0)),
        )

    def _head_pair(self, loc: S3Location, pinned: str) -> tuple[ObjectVersion, ObjectVersion]:
        config, weights = self._head(loc, CONFIG_FILE), self._head(loc, WEIGHTS_FILE)
        if pinned and format_revision(config, weights) != pinned:
            config, weights = self._head_pinned(loc, pinned, config, weights)
        self._check_sizes(loc, config, weights)
        return config, weights

    def _head_pinned(
        self, loc: S3Location, pinned: str, config: ObjectVersion, weights: ObjectVersion
    ) -> tuple[ObjectVersion, ObjectVersion]:
        """The versions a pinned revision names (versioned buckets), or NOT_FOUND."""
        parts = pinned.split(",")
        current = format_revision(config, weights)
        if len(parts) != 2 or not all(parts):
            raise InvalidArgument(
                f"adapter {shown(loc.uri)}: revision {shown(pinned)} is not of the form "
                "'<config version>,<weights version>' (as Plan reports it)",
                field=FIELD,
            )
        if config.version_id is None or weights.version_id is None:
            raise NotFound(
                f"adapter {shown(loc.uri)}: revision {shown(pinned)} is gone; the objects are now "
                "at revision "
                f"{shown(current)} and the bucket is not versioned",
                field=FIELD,
            )
        return self._head(loc, CONFIG_FILE, parts[0]), self._head(loc, WEIGHTS_FILE, parts[1])

    def _check_sizes(self, loc: S3Location, config: ObjectVersion, weights: ObjectVersion) -> None:
        if config.size > MAX_CONFIG_BYTES:
            raise InvalidArgument(
                f"adapter {shown(loc.uri)}: {CONFIG_FILE} is {config.size} bytes, more than the "
                f"{MAX_CONFIG_BYTES} an adapter config may have",
                field=FIELD,
            )
        nbytes = config.size + weights.size
        check_size(loc.uri, nbytes, self.max_adapter_bytes)
        if nbytes > self.settings.cache_bytes:
            raise ResourceExhausted(
                f"adapter {shown(loc.uri)}: its files total {nbytes} bytes, more than the "
                f"{self.settings.cache_bytes} the S3 download cache holds (s3_cache_bytes)",
                field=FIELD,
            )

    def _download(
        self, loc: S3Location, config: ObjectVersion, weights: ObjectVersion, entry: str
    ) -> tuple[Path, str]:
        started = time.monotonic()
        with self.cache.staging() as tmp:
            digest = content_digest(
                self._get(loc, CONFIG_FILE, config, tmp / CONFIG_FILE),
                self._get(loc, WEIGHTS_FILE, weights, tmp / WEIGHTS_FILE),
            )
            meta = {
                "uri": loc.uri,
                "digest": digest,
                "config": {"key": config.key, "etag": config.etag, "version_id": config.version_id},
                "weights": {"key": weights.key, "etag": weights.etag, "version_id": weights.version_id},
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            path, digest = self.cache.commit(tmp, entry)
        log.info(
            "downloaded %s (%d bytes) in %.2fs",
            loc.uri,
            config.size + weights.size,
            time.monotonic() - started,
        )
        return path, digest

    def _get(self, loc: S3Location, name: str, obj: ObjectVersion, dest: Path) -> str:
        """Stream one object to ``dest``, pinned to the version or ETag seen by HEAD; its sha256 (hex)."""
        kwargs: dict[str, Any] = {"Bucket": loc.bucket, "Key": obj.key}
        if obj.version_id:
            kwargs["VersionId"] = obj.version_id
        else:
            kwargs["IfMatch"] = f'"{obj.etag}"'
        written = 0
        sha = hashlib.sha256()
        try:
            body = self._client().get_object(**kwargs)["Body"]
            with open(dest, "wb") as f:
                for chunk in body.iter_chunks(_CHUNK):
                    f.write(chunk)
                    sha.update(chunk)
                    written += len(chunk)
        except LoramergeError:
            raise
        except Exception as exc:
            raise self._translate(exc, loc, name, obj.version_id) from None
        if written != obj.size:
            raise Unavailable(
                f"adapter {shown(loc.uri)}: {loc.object_uri(name)} arrived with {written} bytes, "
                f"expected {obj.size}; retry the request",
                field=FIELD,
            )
        return sha.hexdigest()

    # -- errors -------------------------------------------------------------------------------
    def _translate(
        self, exc: Exception, loc: S3Location, name: str, version_id: str | None
    ) -> LoramergeError:
        """A domain error for a boto/botocore failure. Messages are written here, never copied from
        boto (some S3 error bodies echo the access key id); credentials never appear."""
        from botocore import exceptions as bx

        where = f"adapter {shown(loc.uri)}"
        obj = loc.object_uri(name) + (f" (version {version_id})" if version_id else "")
        endpoint = redact_url(self.settings.endpoint_url)
        if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
            return FailedPrecondition(
                f"{where}: the merge service has no AWS credentials to read it; {NO_CREDENTIALS_HELP}",
                field=FIELD,
            )
        if isinstance(exc, bx.CredentialRetrievalError | bx.TokenRetrievalError | bx.SSOError):
            return FailedPrecondition(
                f"{where}: AWS credentials could not be obtained ({type(exc).__name__}); "
                f"{NO_CREDENTIALS_HELP}",
                field=FIELD,
            )
        if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ConnectionClosedError):
            return Unavailable(f"{where}: S3 endpoint {endpoint} is unreachable; retry later", field=FIELD)
        if isinstance(exc, bx.ReadTimeoutError | bx.ResponseStreamingError | bx.HTTPClientError):
            return Unavailable(
                f"{where}: reading {obj} from {endpoint} failed ({type(exc).__name__}); retry later",
                field=FIELD,
            )
        if not isinstance(exc, bx.ClientError):
            log.warning("unexpected error reading %s: %s", obj, type(exc).__name__)
            return Internal(f"{where}: reading {obj} failed ({type(exc).__name__})", field=FIELD)

        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code.isdigit():
            # HEAD responses carry no error body: ask once more with a one-byte GET for the code.
            code = self._diagnose(loc, name, version_id) or code
        log.info("S3 error %s (HTTP %s) reading %s", code, status, obj)
        if code == "NoSuchBucket":
            return NotFound(f"{where}: S3 bucket {shown(loc.bucket)} does not exist", field=FIELD)
        if code in ("NoSuchVersion", "InvalidArgument", "400", "404", "NoSuchKey") and version_id:
            return NotFound(
                f"{where}: S3 object {loc.object_uri(name)} has no version {shown(version_id)}", field=FIELD
            )
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFound(f"{where}: S3 object {obj} does not exist", field=FIELD)
        if code in _BAD_CREDENTIAL_CODES:
            return FailedPrecondition(
                f"{where}: S3 endpoint {endpoint} rejected the merge service's AWS credentials ({code}); "
                f"{NO_CREDENTIALS_HELP}",
                field=FIELD,
            )
        if code in _DENIED_CODES:
            return PermissionDenied(
                f"{where}: access denied to {obj}; the merge service's AWS identity needs s3:GetObject "
                "on it (check the IAM and bucket policies; without s3:ListBucket, S3 also answers "
                "'access denied' for an object that does not exist)",
                field=FIELD,
            )
        if code in ("PreconditionFailed", "412"):
            return Unavailable(f"{where}: {obj} changed while it was being downloaded; retry", field=FIELD)
        if code == "InvalidBucketName":
            return InvalidArgument(f"{where}: invalid S3 bucket name {shown(loc.bucket)}", field=FIELD)
        if code in _UNAVAILABLE_CODES or status >= 500:
            return Unavailable(
                f"{where}: S3 endpoint {endpoint} failed ({code or status}); retry later", field=FIELD
            )
        return Internal(f"{where}: S3 error {code or status} reading {obj}", field=FIELD)

    def _diagnose(self, loc: S3Location, name: str, version_id: str | None) -> str | None:
        """The S3 error code a GET of the first byte gets (HEAD errors have no body), or None."""
        from botocore import exceptions as bx

        kwargs: dict[str, Any] = {"Bucket": loc.bucket, "Key": loc.key(name), "Range": "bytes=0-0"}
        if version_id:
            kwargs["VersionId"] = version_id
        try:
            self._client().get_object(**kwargs)["Body"].close()
        except bx.ClientError as exc:
            return str(exc.response.get("Error", {}).get("Code", "")) or None
        except Exception:
            return None
        return None


class DownloadCache:
    """Downloaded adapters on local disk, one directory per adapter version, LRU-bounded in bytes.

    An entry holds the two adapter files and META_FILE (origin and content digest). Entries are
    complete or absent: they are written into a staging directory inside the cache root and renamed
    into place. The ``mtime`` of an entry's directory records its last use.
    """

    def __init__(self, root: Path, max_bytes: int, *, min_age_s: float = 300.0) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.min_age_s = min_age_s
        self._lock = threading.Lock()

    def lookup(self, entry: str) -> tuple[Path, str] | None:
        """(directory, content digest) of a complete entry, marked as just used; None on a miss."""
        path = self.root / entry
        try:
            digest = json.loads((path / META_FILE).read_text())["digest"]
            if not ((path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()):
                return None
            os.utime(path)
        except (OSError, ValueError, KeyError, TypeError):  # absent, evicted meanwhile, or unreadable
            return None
        return path, str(digest)

    def staging(self) -> _Staging:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return _Staging(self.root / f"{_TMP_PREFIX}{uuid.uuid4().hex}")

    def commit(self, tmp: Path, entry: str) -> tuple[Path, str]:
        """Move a complete staging directory into place (or keep the copy that won a race)."""
        path = self.root / entry
        if path.exists() and self.lookup(entry) is None:
            self._remove(path)  # a damaged entry (e.g. its metadata lost): replace it
        with contextlib.suppress(OSError):  # on failure another download of this version got there first
            os.rename(tmp, path)
        hit = self.lookup(entry)
        if hit is None:
            raise Internal(f"the S3 download cache could not store {entry} under {self.root}")
        self.evict(keep=path)
        return hit

    def entries(self) -> list[tuple[Path, int, float]]:
        """(path, bytes, last use) of each complete entry, least recently used first."""
        out = []
        if not self.root.is_dir():
            return out
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
                out.append((entry, size, entry.stat().st_mtime))
            except FileNotFoundError:
                continue
        out.sort(key=lambda e: e[2])
        return out

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Delete least recently used entries until the total fits ``max_bytes``."""
        removed: list[Path] = []
        with self._lock:
            entries = self.entries()
            total = sum(size for _, size, _ in entries)
            now = time.time()
            self._sweep_staging(now)
            for path, size, used in entries:
                if total <= self.max_bytes:
                    break
                if path == keep or now - used < self.min_age_s:
                    continue
                if not self._remove(path):
                    continue
                total -= size
                removed.append(path)
        for path in removed:
            log.info("evicted %s from the S3 download cache", path.name)
        return removed

    def _remove(self, path: Path) -> bool:
        """Delete an entry; renamed away first so that no reader sees it half deleted."""
        doomed = self.root / f"{_TMP_PREFIX}evict-{uuid.uuid4().hex}"
        try:
            os.rename(path, doomed)
        except OSError:
            return False
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def _sweep_staging(self, now: float) -> None:
        """Remove staging directories left behind by a process that died mid-download."""
        for entry in self.root.glob(f"{_TMP_PREFIX}*"):
            try:
                if now - entry.stat().st_mtime > _STALE_STAGING_S:
                    shutil.rmtree(entry, ignore_errors=True)
            except FileNotFoundError:
                continue


class _Staging:
    """A staging directory that is removed unless it was committed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Path:
        self.path.mkdir()
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
