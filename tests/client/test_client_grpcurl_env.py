"""The grpcurl recipes' environment handling (addresses, bearer token, TLS flags) against the
scripted services behind the real auth interceptor; the recipes' calls themselves are checked
against the real services in tests/e2e/test_grpcurl_recipes.py."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from tests.client.conftest import PLAIN, serve_fakes

RECIPES = Path(__file__).resolve().parents[2] / "clients" / "grpcurl"


def test_token_and_addresses_from_environment() -> None:
    thread, _, inference = serve_fakes(replace(PLAIN, auth_token="s3cret"))
    with thread as server:
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "MERGE_ADDR": server.address,
            "INFERENCE_ADDR": server.address,
        }
        env.pop("LORAMERGE_TOKEN", None)

        def run(script: str, **extra: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [str(RECIPES / script)], env={**env, **extra}, capture_output=True, text=True, timeout=60
            )

        denied = run("list_adapters.sh")  # reflection is open, the call itself needs the token
        assert denied.returncode != 0 and "bearer token" in denied.stderr
        allowed = run("list_adapters.sh", LORAMERGE_TOKEN="s3cret")
        assert allowed.returncode == 0 and '"m-1"' in allowed.stdout
        assert inference.seen.metadata[-1]["authorization"] == "Bearer s3cret"
        assert run("health.sh", LORAMERGE_TOKEN="s3cret").returncode == 0
        tls = run("list_cached.sh", LORAMERGE_TOKEN="s3cret", GRPCURL_TLS="-insecure")
        assert tls.returncode != 0 and "TLS handshake" in tls.stderr  # TLS flags replace -plaintext
