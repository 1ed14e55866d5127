"""The HTTP front-end's gate (drain, bearer token, body limit, error shapes), without an engine."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from inference_service.dataplane import DataPlane
from inference_service.http_server import HttpFrontEnd, HttpOptions
from loramerge_common.auth import TokenAuth


def client(serving: bool = True, token: str | None = None, limit: int = 1024) -> TestClient:
    front = HttpFrontEnd(
        DataPlane(),
        HttpOptions(listen="127.0.0.1:0", max_body_bytes=limit, auth=TokenAuth(token) if token else None),
        serving=lambda: serving,
    )
    return TestClient(front.app)


def test_draining_answers_503_with_retry_after_in_each_shape() -> None:
    c = client(serving=False)
    r = c.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "service_unavailable_error"
    # The retry must not ride the kept-alive connection back to this draining process.
    assert r.headers["connection"] == "close"
    r = c.post("/generate", json={"inputs": "x"})
    assert r.status_code == 503 and r.json()["error_type"] == "overloaded"
    assert r.headers["connection"] == "close"
    assert c.get("/ready").status_code == 503
    assert c.get("/live").status_code == 200


def test_bearer_token_is_required_when_configured() -> None:
    c = client(token="s3cret")
    r = c.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = c.post("/", json={"inputs": "x"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]
    # With the token the call reaches the data plane, which has no engine yet: 503, not 401.
    r = c.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 503
    assert c.get("/health").status_code == 200  # probes need no token


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/generate", "/"])
def test_oversized_and_malformed_bodies(path: str) -> None:
    c = client(limit=64)
    r = c.post(path, content=b"{" + b" " * 100 + b"}", headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    r = c.post(path, content=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 422)
    body = r.json()
    assert (
        ("error" in body and "message" in body["error"])
        if path.startswith("/v1")
        else body["error_type"] == "validation"
    )
