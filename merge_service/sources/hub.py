"""Adapters on the Hugging Face Hub, fetched with huggingface_hub into its usual cache.

The id is a repo id, optionally with a revision: ``org/name`` or ``org/name@<branch|tag|commit>``; an
empty revision means the default branch. Exactly two files are fetched (``hf_hub_download``, never a
snapshot), the weights pinned to the commit the config came from, so both belong to one version.
The digest is ``hub:<repo>@<commit>``: a commit fixes the content.

huggingface_hub's cache and offline mode are honoured: ``HF_HUB_OFFLINE=1`` (or ``offline=True``)
serves only what the cache holds, resolving branches through the cache's refs. When a byte limit is
set and the hub is reachable, file sizes come from HEAD requests before anything is downloaded.

Errors: repo, revision or file missing → NotFound; gated repo, 401/403 → PermissionDenied; only
pickled ``adapter_model.bin`` weights → FailedPrecondition (never downloaded); hub unreachable →
Unavailable; offline mode with nothing cached → FailedPrecondition (retrying cannot help); malformed
repo id → InvalidArgument.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from huggingface_hub import (
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from loramerge.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LoramergeError,
    NotFound,
    PermissionDenied,
    Unavailable,
    shown,
)
from merge_service.sources.base import (
    CONFIG_FILE,
    PICKLED_WEIGHTS_FILE,
    WEIGHTS_FILE,
    ResolvedSource,
    check_size,
    pickled_only_error,
)
from merge_service.spec import AdapterRef, SourceKind

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport-level failures of whichever HTTP client this huggingface_hub uses."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, OfflineModeIsEnabled]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(__import__(module).TransportError)
    try:
        import requests

        errors.append(requests.exceptions.ConnectionError)
        errors.append(requests.exceptions.Timeout)
    except ImportError:
        pass
    return tuple(errors)


_NETWORK_ERRORS = _network_errors()


def is_offline() -> bool:
    """huggingface_hub's offline switch; also read from the environment, which it samples only at import."""
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return constants.HF_HUB_OFFLINE or env in ("1", "ON", "YES", "TRUE")


def parse_hub_id(adapter_id: str, revision: str = "") -> tuple[str, str | None]:
    """(repo id, revision or None for the default branch) from ``org/name[@rev]`` and a separate revision."""
    repo, sep, inline = adapter_id.partition("@")
    if sep and not inline:
        raise InvalidArgument(f"adapter {shown(adapter_id)}: empty revision after '@'", field="adapter")
    if inline and revision and inline != revision:
        raise InvalidArgument(
            f"adapter {shown(adapter_id)}: revision {shown(inline)} in the id disagrees with "
            f"revision {shown(revision)}",
            field="adapter",
        )
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise InvalidArgument(
            f"adapter {shown(adapter_id)} is not a valid hub repo id: {shown(str(e), 160, quote=False)}",
            field="adapter",
        ) from None
    return repo, (inline or revision or None)


class HubSource:
    kind = SourceKind.HUB

    def __init__(
        self,
        token: str | None = None,
        cache_dir: Path | None = None,
        max_adapter_bytes: int | None = None,
        endpoint: str | None = None,
        offline: bool | None = None,
    ) -> None:
        self._token = token  # never logged or put in a message
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.max_adapter_bytes = max_adapter_bytes
        self.endpoint = endpoint
        self._offline = offline

    def __repr__(self) -> str:
        return f"HubSource(cache_dir={self.cache_dir!r}, endpoint={self.endpoint!r})"

    @property
    def offline(self) -> bool:
        return is_offline() if self._offline is None else self._offline

    def _cache_dir(self) -> str:
        return str(self.cache_dir) if self.cache_dir else constants.HF_HUB_CACHE

    def _download(self, repo: str, filename: str, revision: str | None) -> str:
        return hf_hub_download(
            repo,
            filename,
            revision=revision,
            cache_dir=self.cache_dir,
            token=self._token,
            local_files_only=self.offline,
            endpoint=self.endpoint,
        )

    def _remote_size(self, repo: str, filename: str, revision: str | None) -> tuple[int | None, str | None]:
        meta = get_hf_file_metadata(
            hf_hub_url(repo, filename, revision=revision, endpoint=self.endpoint),
            token=self._token,
            endpoint=self.endpoint,
        )
        return meta.size, meta.commit_hash

    def _cached(self, repo: str, filename: str, revision: str | None) -> object:
        return try_to_load_from_cache(repo, filename, cache_dir=self._cache_dir(), revision=revision)

    def _cached_at_commit(self, repo: str, filename: str, revision: str | None) -> bool:
        """A file cached under a commit id cannot change, so its size needs no HEAD request."""
        return bool(revision and _COMMIT.match(revision)) and isinstance(
            self._cached(repo, filename, revision), str
        )

    def _map_error(self, e: BaseException, aid: str, what: str) -> LoramergeError:
        """A domain error for a huggingface_hub failure while fetching ``what``."""
        if isinstance(e, GatedRepoError):
            return PermissionDenied(
                f"adapter {shown(aid)}: the hub repo is gated and the configured token has no access",
                field="adapter",
            )
        if isinstance(e, RepositoryNotFoundError):
            return NotFound(
                f"adapter {shown(aid)}: no such hub repo (or it is private and the token has no access)",
                field="adapter",
            )
        if isinstance(e, RevisionNotFoundError):
            return NotFound(f"adapter {shown(aid)}: the hub repo has no such revision", field="adapter")
        if isinstance(e, LocalEntryNotFoundError):
            if self.offline:
                # Not transient: retrying cannot help until someone fills the cache or turns
                # offline mode off, so clients must not treat it as UNAVAILABLE.
                return FailedPrecondition(
                    f"adapter {shown(aid)}: hub offline mode (HF_HUB_OFFLINE) is on and {what} is not in the "
                    f"hub cache {self._cache_dir()}",
                    field="adapter",
                )
            return Unavailable(
                f"adapter {shown(aid)}: cannot reach the hub and {what} is not in the hub cache",
                field="adapter",
            )
        if isinstance(e, EntryNotFoundError):
            return NotFound(f"adapter {shown(aid)}: the hub repo has no {what}", field="adapter")
        if isinstance(e, HfHubHTTPError):
            status = e.response.status_code if e.response is not None else None
            if status in (401, 403):
                return PermissionDenied(
                    f"adapter {shown(aid)}: the hub refused access to {what} (HTTP {status})", field="adapter"
                )
            if status == 404:
                return NotFound(f"adapter {shown(aid)}: the hub has no {what} (HTTP 404)", field="adapter")
            return Unavailable(
                f"adapter {shown(aid)}: the hub answered HTTP {status} for {what}", field="adapter"
            )
        if isinstance(e, _NETWORK_ERRORS):
            return Unavailable(
                f"adapter {shown(aid)}: cannot reach the hub ({type(e).__name__})", field="adapter"
            )
        return Internal(f"adapter {shown(aid)}: unexpected hub error {type(e).__name__}", field="adapter")

    def _pickled_only(self, repo: str, commit: str) -> bool:
        """Whether the repo has adapter_model.bin at this commit; asks without downloading it."""
        if isinstance(self._cached(repo, PICKLED_WEIGHTS_FILE, commit), str):
            return True
        if self.offline:
            return False
        try:
            self._remote_size(repo, PICKLED_WEIGHTS_FILE, commit)
        except Exception:
            return False
        return True

    def resolve(self, ref: AdapterRef) -> ResolvedSource:
        aid = ref.id
        repo, revision = parse_hub_id(aid, ref.revision)
        limit = self.max_adapter_bytes
        online_size_check = bool(limit) and not self.offline

        try:
            if online_size_check and not self._cached_at_commit(repo, CONFIG_FILE, revision):
                size, commit = self._remote_size(repo, CONFIG_FILE, revision)
                check_size(aid, size or 0, limit)
                revision = commit or revision
            config_path = Path(self._download(repo, CONFIG_FILE, revision))
        except LoramergeError:
            raise
        except Exception as e:
            raise self._map_error(e, aid, CONFIG_FILE) from None
        commit = config_path.parent.name
        if not _COMMIT.match(commit):
            raise Internal(
                f"adapter {shown(aid)}: cannot tell the commit of cached {config_path}", field="adapter"
            )

        try:
            if online_size_check and not self._cached_at_commit(repo, WEIGHTS_FILE, commit):
                size, _ = self._remote_size(repo, WEIGHTS_FILE, commit)
                check_size(aid, config_path.stat().st_size + (size or 0), limit)
            weights_path = Path(self._download(repo, WEIGHTS_FILE, commit))
        except LoramergeError:
            raise
        except Exception as e:
            if isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):
                if self._pickled_only(repo, commit):
                    raise pickled_only_error(aid) from None
            elif isinstance(e, LocalEntryNotFoundError):
                if self._pickled_only(repo, commit):
                    raise pickled_only_error(aid) from None
                if self._cached(repo, WEIGHTS_FILE, commit) is not None:  # cached as absent
                    raise NotFound(
                        f"adapter {shown(aid)}: the hub repo has no {WEIGHTS_FILE}", field="adapter"
                    ) from None
            raise self._map_error(e, aid, WEIGHTS_FILE) from None

        if weights_path.parent != config_path.parent:
            raise Internal(
                f"adapter {shown(aid)}: the hub cache returned files of two commits", field="adapter"
            )
        nbytes = config_path.stat().st_size + weights_path.stat().st_size
        check_size(aid, nbytes, limit)
        return ResolvedSource(
            id=aid,
            kind=SourceKind.HUB,
            revision=commit,
            digest=f"hub:{repo}@{commit}",
            path=config_path.parent,
            nbytes=nbytes,
        )
