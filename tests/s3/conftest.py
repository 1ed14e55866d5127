"""A real S3 protocol server on loopback (moto's standalone server in a child process).

The server runs with IAM enforcement on: setup (users, policies, buckets) happens before auth is
switched on through moto's ``/moto-api/reset-auth``; afterwards every request must be signed with
keys of an IAM user, and the server answers AccessDenied where the user's policy does not allow.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

boto3 = pytest.importorskip("boto3")

_SERVER = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""

REGION = "us-east-1"
PUBLIC_BUCKET = "adapters"  # the reader user may read it
PRIVATE_BUCKET = "private-adapters"  # the reader user is denied by policy
VERSIONED_BUCKET = "versioned-adapters"


@dataclass(frozen=True)
class Keys:
    access_key_id: str
    secret_access_key: str

    def session(self) -> boto3.Session:
        return boto3.Session(
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=REGION,
        )


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    admin: Keys  # allowed everything
    reader: Keys  # may read any bucket but PRIVATE_BUCKET (an explicit Deny)

    def client(self, keys: Keys | None = None):
        return (keys or self.admin).session().client("s3", endpoint_url=self.endpoint_url)

    def upload_adapter(self, adapter_dir: Path, bucket: str, prefix: str) -> None:
        client = self.client()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            client.upload_file(str(adapter_dir / name), bucket, f"{prefix}/{name}")


def _policy(*statements: tuple[str, list[str], list[str]]) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": e, "Action": actions, "Resource": res} for e, actions, res in statements
            ],
        }
    )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        port = int(proc.stdout.readline())
        endpoint = f"http://127.0.0.1:{port}"
        # Before auth is on, any key pair is accepted: use one to set the server up.
        setup = Keys("setup", "setup")
        iam = setup.session().client("iam", endpoint_url=endpoint)
        s3 = setup.session().client("s3", endpoint_url=endpoint)
        for bucket in (PUBLIC_BUCKET, PRIVATE_BUCKET, VERSIONED_BUCKET):
            s3.create_bucket(Bucket=bucket)
        s3.put_bucket_versioning(Bucket=VERSIONED_BUCKET, VersioningConfiguration={"Status": "Enabled"})
        users = {}
        read = ["s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket"]
        private = [f"arn:aws:s3:::{PRIVATE_BUCKET}", f"arn:aws:s3:::{PRIVATE_BUCKET}/*"]
        for user, policy in (
            ("admin", _policy(("Allow", ["*"], ["*"]))),
            ("reader", _policy(("Allow", read, ["*"]), ("Deny", ["s3:*"], private))),
        ):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName=f"{user}-policy", PolicyDocument=policy)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            users[user] = Keys(key["AccessKeyId"], key["SecretAccessKey"])
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert json.loads(resp.read())["status"] == "ok"
        yield S3Server(endpoint, admin=users["admin"], reader=users["reader"])
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def no_aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An environment where boto3's credential chain finds nothing (and asks no metadata service)."""
    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
