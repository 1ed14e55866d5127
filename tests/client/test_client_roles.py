"""Roles through the real interceptor: LoadAdapter, UnloadAdapter and Evict need the admin token when
auth is on; with user tokens only they are PERMISSION_DENIED; with no auth everything stays open.
Also the shared TokenAuth decision that the HTTP front-ends call."""

from __future__ import annotations

from dataclasses import replace

import grpc
import pytest

from loramerge_client import InferenceClient, MergeClient
from loramerge_client.retry import NO_RETRY
from loramerge_common.auth import TokenAuth
from loramerge_common.server import GrpcServer, ServerSettings
from tests.client.conftest import PLAIN, serve_fakes

SPEC = {"ids": ["a", "b"], "weights": [0.5, 0.5]}


def _codes(address: str, token: str | None) -> dict[str, str]:
    """The status of each call (OK or the code's name) with ``token``."""
    out: dict[str, str] = {}
    with (
        MergeClient(address, token=token, retry=NO_RETRY) as merge,
        InferenceClient(address, token=token, retry=NO_RETRY) as inference,
    ):
        calls = {
            "plan": lambda: merge.plan(SPEC),
            "evict": lambda: merge.evict(all=True),
            "list_adapters": inference.list_adapters,
            "unload": lambda: inference.unload_adapter("k" * 64),
        }
        for name, call in calls.items():
            try:
                call()
                out[name] = "OK"
            except Exception as e:  # the client's errors carry .code
                out[name] = e.code.name  # type: ignore[attr-defined]
    return out


@pytest.mark.parametrize(
    ("settings", "token", "expected"),
    [
        (PLAIN, None, dict(plan="OK", evict="OK", list_adapters="OK", unload="OK")),
        (
            replace(PLAIN, auth_token="user"),
            "user",
            dict(plan="OK", evict="PERMISSION_DENIED", list_adapters="OK", unload="PERMISSION_DENIED"),
        ),
        (
            replace(PLAIN, auth_token="user", admin_token="root"),
            "user",
            dict(plan="OK", evict="PERMISSION_DENIED", list_adapters="OK", unload="PERMISSION_DENIED"),
        ),
        (
            replace(PLAIN, auth_token="user", admin_token="root"),
            "root",
            dict(plan="OK", evict="OK", list_adapters="OK", unload="OK"),
        ),
        (
            replace(PLAIN, auth_token="user", admin_token="root"),
            None,
            dict(
                plan="UNAUTHENTICATED",
                evict="UNAUTHENTICATED",
                list_adapters="UNAUTHENTICATED",
                unload="UNAUTHENTICATED",
            ),
        ),
        (
            replace(PLAIN, admin_token="root"),
            None,
            dict(plan="OK", evict="UNAUTHENTICATED", list_adapters="OK", unload="UNAUTHENTICATED"),
        ),
    ],
)
def test_admin_calls_need_the_admin_token(settings: ServerSettings, token: str | None, expected) -> None:
    thread, _, _ = serve_fakes(settings)
    with thread as server:
        assert _codes(server.address, token) == expected


def test_admin_token_from_file_and_distinct(tmp_path) -> None:
    f = tmp_path / "admin"
    f.write_text("root\n")
    thread, _, _ = serve_fakes(replace(PLAIN, auth_token="user", admin_token_file=f))
    with thread as server:
        assert _codes(server.address, "root")["evict"] == "OK"
    with pytest.raises(ValueError, match="differ"):
        GrpcServer(replace(PLAIN, auth_token="same", admin_token="same"), [])


def test_token_auth_for_http_front_ends() -> None:
    auth = TokenAuth("user", "root")
    assert auth.check("Bearer root", admin=True) is None
    assert auth.check("Bearer user", admin=False) is None
    denied = auth.check("Bearer user", admin=True)
    assert denied is not None and denied.code == grpc.StatusCode.PERMISSION_DENIED
    assert denied.http_status == 403
    missing = auth.check(None, admin=False)
    assert missing is not None and missing.http_status == 401
    assert TokenAuth(None, None).check(None, admin=True) is None
    assert TokenAuth("user").check("Bearer user", admin=True).code == grpc.StatusCode.PERMISSION_DENIED
