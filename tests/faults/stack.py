"""A hardened loramerge stack as real processes on loopback, for fault, security, fuzz and load tests.

``Stack.start`` runs ``python -m merge_service`` (mutual TLS, bearer token, disk cache, small request
limits) and ``python -m inference_service`` (TLS, bearer token, vLLM on a tiny model) that reaches the
merge service through a ``TcpProxy`` (mutual TLS and its own bearer token on that hop). The proxy lets
a test slow the merge stream down, break it, or point it at a restarted merge service; TLS runs end
to end through it (the proxy only copies bytes). Certificates are made on the spot by ``make_pki``.

Used by the session fixture ``hardened_stack`` (tests/conftest.py) and by ``make load``
(benchmarks/load.py, which may turn TLS off).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loramerge.v1 import inference_pb2_grpc, merge_pb2_grpc
from loramerge_common.auth import bearer_metadata
from tests.e2e.conftest import (
    ENGINE_START_TIMEOUT_S,
    ServiceProcess,
    _child_env,
    _inference_ready,
    _merge_ready,
    free_port,
)

HUB_TOKEN_MARKER = "hf_stackNeverLogThis0123456789"
MAX_LORA_RANK = 16
MAX_LOADED_ADAPTERS = 3
# vLLM LoRA slots per batch: fewer than the load test's clients and specs, so batches fill every slot.
MAX_LORAS = 4


# -- certificates ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate (localhost, 127.0.0.1) and a client certificate it signed,
    and a client certificate signed by an unrelated ("rogue") CA."""

    ca_crt: Path
    server_crt: Path
    server_key: Path
    client_crt: Path
    client_key: Path
    rogue_client_crt: Path
    rogue_client_key: Path


def make_pki(directory: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(cn: str, key, issuer: x509.Name, issuer_key, *, ca: bool, server: bool = False):
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return b.sign(issuer_key, hashes.SHA256())

    def save(stem: str, key, cert) -> tuple[Path, Path]:
        crt_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o600)
        return crt_path, key_path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("loramerge test CA")
    ca_crt, _ = save("ca", ca_key, issue("loramerge test CA", ca_key, ca_name, ca_key, ca=True))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = save(
        "server", server_key, issue("localhost", server_key, ca_name, ca_key, ca=False, server=True)
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = save("client", client_key, issue("inference", client_key, ca_name, ca_key, ca=False))
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue_cert = issue("inference", rogue_key, name("rogue CA"), rogue_ca_key, ca=False)
    rogue = save("rogue-client", rogue_key, rogue_cert)
    return Pki(ca_crt, *server, *client, *rogue)


# -- a TCP proxy the tests steer ---------------------------------------------------------------------


class TcpProxy:
    """Copies bytes between clients and ``target`` on loopback, on threads.

    ``throttle(n)`` limits the server-to-client direction to about ``n`` bytes per second (None:
    full speed); ``downstream_bytes`` counts what was delivered that way. ``retarget(port)`` sends
    new connections to another port (a restarted server); ``sever()`` closes every open connection.
    """

    SLICE = 4096

    def __init__(self, target_port: int = 0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._rate: float | None = None
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self.downstream_bytes = 0
        self._closed = False
        threading.Thread(target=self._accept, name="tcp-proxy", daemon=True).start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def retarget(self, port: int) -> None:
        self.target_port = port

    def throttle(self, bytes_per_second: float | None) -> None:
        self._rate = bytes_per_second

    def sever(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self.sever()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((self.host, self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        try:
            while True:
                data = src.recv(self.SLICE if downstream else 65536)
                if not data:
                    break
                rate = self._rate if downstream else None
                if rate:
                    time.sleep(len(data) / rate)
                dst.sendall(data)
                if downstream:
                    self.downstream_bytes += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)


# -- the stack ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Request limits the merge and inference services are started with (RESOURCE_EXHAUSTED beyond)."""

    max_adapters: int = 4
    max_adapter_bytes: int = 0  # 0: computed from the adapters (the largest ordinary one fits)
    max_request_bytes: int = 0  # 0: computed (three ordinary adapters fit, four do not)
    merge_max_message_bytes: int = 64 * 1024
    inference_max_message_bytes: int = 1024 * 1024
    inference_max_adapter_bytes: int = 1024 * 1024


@dataclass
class Stack:
    """Both services, the proxy between them, and what a client needs to call them."""

    root: Path
    model: Path
    adapter_root: Path
    tls: bool
    pki: Pki | None
    merge_token: str | None
    inference_token: str | None
    limits: Limits
    proxy: TcpProxy
    merge: ServiceProcess
    inference: ServiceProcess
    cache_dir: Path
    adapter_dir: Path
    merge_restarts: int = 0
    # Admin tokens (LoadAdapter, UnloadAdapter, Evict), distinct from the user tokens above.
    merge_admin_token: str | None = None
    inference_admin_token: str | None = None
    _channels: list[grpc.Channel] = field(default_factory=list)

    # -- clients --

    def channel(self, address: str, *, cert: bool = True) -> grpc.Channel:
        """A channel to ``address`` with the stack's TLS (client certificate unless ``cert`` is False)."""
        opts = [("grpc.max_send_message_length", 64 * 2**20), ("grpc.max_receive_message_length", 64 * 2**20)]
        if not self.tls:
            return grpc.insecure_channel(address, options=opts)
        assert self.pki is not None
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.pki.ca_crt.read_bytes(),
            private_key=self.pki.client_key.read_bytes() if cert else None,
            certificate_chain=self.pki.client_crt.read_bytes() if cert else None,
        )
        return grpc.secure_channel(address, creds, options=opts)

    def _kept(self, channel: grpc.Channel) -> grpc.Channel:
        self._channels.append(channel)
        return channel

    @property
    def merge_metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.merge_token) if self.merge_token else ()

    @property
    def inference_metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.inference_token) if self.inference_token else ()

    @property
    def merge_admin_metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.merge_admin_token) if self.merge_admin_token else ()

    @property
    def inference_admin_metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.inference_admin_token) if self.inference_admin_token else ()

    def merge_stub(self) -> merge_pb2_grpc.MergeServiceStub:
        """A stub on a new channel to the merge service itself (not through the proxy)."""
        return merge_pb2_grpc.MergeServiceStub(self._kept(self.channel(self.merge.address)))

    def inference_stub(self) -> inference_pb2_grpc.InferenceServiceStub:
        return inference_pb2_grpc.InferenceServiceStub(self._kept(self.channel(self.inference.address)))

    def health(self, address: str) -> int:
        with self.channel(address) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status

    def serving(self) -> bool:
        serving = health_pb2.HealthCheckResponse.SERVING
        return self.health(self.merge.address) == serving and self.health(self.inference.address) == serving

    # -- the inference service's adapter folders --

    def run_dir(self) -> Path:
        runs = list(self.adapter_dir.glob("run-*"))
        assert len(runs) == 1, runs
        return runs[0]

    def adapter_folders(self) -> set[str]:
        """Folders of received adapters (the zero adapter's folder excluded)."""
        return {p.name for p in self.run_dir().iterdir() if p.is_dir() and p.name[:8].isdigit()}

    # -- faults --

    def kill_merge(self) -> None:
        """SIGKILL the merge service's process group (no drain, no clean-up) and cut the connections
        through the proxy: what the dead process had already handed to the kernel, and the proxy had
        not passed on yet, is lost as it would be with the pod's network."""
        proc = self.merge.proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        self.proxy.sever()

    def restart_merge(self, timeout: float = 180) -> None:
        """Stop the merge service (if running) and start a new one on a new port; the proxy follows it."""
        self.merge.stop()
        self.merge_restarts += 1
        self.merge = _merge_process(self, log_name=f"merge-service-{self.merge_restarts}.log")
        self.merge.start(_merge_ready, timeout)
        self.proxy.retarget(self.merge.port)

    def ensure_inference(self) -> None:
        """Start the inference service again if a test stopped it."""
        if not self.inference.running:
            self.inference = _inference_process(self, log_name=f"inference-{time.monotonic_ns()}.log")
            Path(str(self.inference.extra["ready_file"])).unlink(missing_ok=True)  # the dead one's
            self.inference.start(_inference_ready, ENGINE_START_TIMEOUT_S)

    def log_events(self, service: ServiceProcess, message: str) -> list[dict]:
        """The JSON log records of ``service`` whose message is ``message``."""
        out = []
        for line in service.log_text().splitlines():
            if f'"{message}"' in line:
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("msg") == message:
                        out.append(record)
        return out

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.root.glob("*.log")))

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
        self.inference.stop()
        self.merge.stop()
        self.proxy.close()
        shutil.rmtree(self.adapter_dir, ignore_errors=True)

    # -- start --

    @classmethod
    def start(
        cls,
        root: Path,
        model: Path,
        adapter_root: Path,
        *,
        tls: bool = True,
        auth: bool = True,
        limits: Limits | None = None,
    ) -> Stack:
        """Start both services (in parallel: the inference service dials the proxy, which exists first)."""
        root.mkdir(parents=True, exist_ok=True)
        limits = limits or default_limits(adapter_root)
        pki = make_pki(root / "pki") if tls else None
        merge_token = secrets.token_urlsafe(24) if auth else None
        inference_token = secrets.token_urlsafe(24) if auth else None
        merge_admin_token = secrets.token_urlsafe(24) if auth else None
        inference_admin_token = secrets.token_urlsafe(24) if auth else None
        for stem, token in (
            ("merge", merge_token),
            ("inference", inference_token),
            ("merge-admin", merge_admin_token),
            ("inference-admin", inference_admin_token),
        ):
            if token:
                (root / f"{stem}.token").write_text(token + "\n")
                (root / f"{stem}.token").chmod(0o600)
        shm = Path("/dev/shm")
        adapter_dir = (
            shm if shm.is_dir() else root
        ) / f"loramerge-stack-{os.getpid()}-{secrets.token_hex(3)}"
        stack = cls(
            root=root,
            model=model,
            adapter_root=adapter_root,
            tls=tls,
            pki=pki,
            merge_token=merge_token,
            inference_token=inference_token,
            merge_admin_token=merge_admin_token,
            inference_admin_token=inference_admin_token,
            limits=limits,
            proxy=TcpProxy(),
            merge=None,  # type: ignore[arg-type]
            inference=None,  # type: ignore[arg-type]
            cache_dir=root / "merge-cache",
            adapter_dir=adapter_dir,
        )
        stack.merge = _merge_process(stack, log_name="merge-service.log")
        stack.inference = _inference_process(stack, log_name="inference-service.log")
        try:
            starter = threading.Thread(target=stack.merge.start, args=(_merge_ready, 180), daemon=True)
            starter.start()
            starter.join(200)
            if not stack.merge.running or not stack.merge.port:
                raise RuntimeError(f"merge service did not start:\n{stack.merge.log_text()[-3000:]}")
            stack.proxy.retarget(stack.merge.port)
            stack.inference.start(_inference_ready, ENGINE_START_TIMEOUT_S)
        except BaseException:
            stack.close()
            raise
        return stack


def adapter_file_bytes(directory: Path) -> int:
    """What the merge service counts against its byte limits: the config and the weights."""
    return sum(
        (directory / name).stat().st_size for name in ("adapter_config.json", "adapter_model.safetensors")
    )


def default_limits(adapter_root: Path) -> Limits:
    """Limits that every ordinary test adapter fits and that three rank-8 adapters fit but four do not."""
    sizes = {p.name: adapter_file_bytes(p) for p in adapter_root.iterdir() if p.is_dir()}
    largest = max(sizes.values())
    three = sum(sorted(sizes.values())[-3:])
    return Limits(max_adapter_bytes=largest, max_request_bytes=three + min(sizes.values()) // 2)


def _merge_process(stack: Stack, *, log_name: str) -> ServiceProcess:
    metrics_port = free_port()
    argv = [
        sys.executable, "-m", "merge_service",
        "--listen", "127.0.0.1:0",
        "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1",
        "--adapter-root", str(stack.adapter_root),
        "--cache-dir", str(stack.cache_dir),
        "--device", "cpu",
        "--grace-seconds", "5",
        "--log-format", "json",
        "--chunk-bytes", "16KiB",  # many data messages per stream: a break lands between two of them
        "--max-adapters", str(stack.limits.max_adapters),
        "--max-adapter-bytes", str(stack.limits.max_adapter_bytes),
        "--max-request-bytes", str(stack.limits.max_request_bytes),
        "--max-receive-message-bytes", str(stack.limits.merge_max_message_bytes),
        "--hub-cache-dir", str(stack.root / "hub-cache"),
        "--s3-cache-dir", str(stack.root / "s3-cache"),
        # S3 ids reach a closed loopback port, never the internet.
        "--s3-endpoint-url", f"http://127.0.0.1:{free_port()}",
    ]  # fmt: skip
    if stack.tls:
        assert stack.pki is not None
        argv += ["--tls-cert", str(stack.pki.server_crt), "--tls-key", str(stack.pki.server_key)]
        argv += ["--tls-client-ca", str(stack.pki.ca_crt)]
    if stack.merge_token:
        argv += ["--auth-token-file", str(stack.root / "merge.token")]
        argv += ["--admin-token-file", str(stack.root / "merge-admin.token")]
    env = _child_env()
    env.update(
        HF_TOKEN=HUB_TOKEN_MARKER,
        AWS_ACCESS_KEY_ID="stack-test",
        AWS_SECRET_ACCESS_KEY="stack-test-secret",
        AWS_EC2_METADATA_DISABLED="true",
    )
    return ServiceProcess(
        name="merge service", argv=argv, log_path=stack.root / log_name, env=env, metrics_port=metrics_port
    )


def _inference_process(stack: Stack, *, log_name: str) -> ServiceProcess:
    metrics_port = free_port()
    ready = stack.root / "inference-ready.json"
    argv = [
        sys.executable, "-m", "inference_service",
        "--model", str(stack.model),
        "--listen", "127.0.0.1:0",
        "--http-listen", "127.0.0.1:0",
        "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1",
        "--merge-service", stack.proxy.address,
        "--adapter-dir", str(stack.adapter_dir),
        "--dtype", "float32",
        "--kv-cache-bytes", "64MiB",
        "--max-model-len", "512",
        "--max-lora-rank", str(MAX_LORA_RANK),
        "--max-loras", str(MAX_LORAS),
        "--max-cpu-loras", str(MAX_LORAS + 4),
        "--max-loaded-adapters", str(MAX_LOADED_ADAPTERS),
        "--max-adapter-bytes", str(stack.limits.inference_max_adapter_bytes),
        "--max-receive-message-bytes", str(stack.limits.inference_max_message_bytes),
        "--ready-file", str(ready),
        "--fetch-timeout-ceiling-seconds", "60",
        "--merge-retry-max-seconds", "0.5",
        "--grace-seconds", "30",
        "--log-format", "json",
    ]  # fmt: skip
    if stack.tls:
        assert stack.pki is not None
        argv += ["--tls-cert", str(stack.pki.server_crt), "--tls-key", str(stack.pki.server_key)]
        argv += ["--merge-tls-ca", str(stack.pki.ca_crt)]
        argv += ["--merge-tls-cert", str(stack.pki.client_crt), "--merge-tls-key", str(stack.pki.client_key)]
    if stack.inference_token:
        argv += ["--auth-token-file", str(stack.root / "inference.token")]
        argv += ["--admin-token-file", str(stack.root / "inference-admin.token")]
    if stack.merge_token:
        argv += ["--merge-auth-token-file", str(stack.root / "merge.token")]
    return ServiceProcess(
        name="inference service",
        argv=argv,
        log_path=stack.root / log_name,
        env=_child_env(),
        metrics_port=metrics_port,
        extra={"ready_file": ready, "adapter_dir": stack.adapter_dir},
    )


@contextlib.contextmanager
def running_stack(root: Path, model: Path, adapter_root: Path, **kw) -> Iterator[Stack]:
    stack = Stack.start(root, model, adapter_root, **kw)
    try:
        yield stack
    finally:
        stack.close()


def stack_adapter_root(src: Path, dst: Path, model: Path) -> Path:
    """A copy of the session's adapters plus "big" (rank 16: more bytes than max_adapter_bytes allows)."""
    from tests.factories import make_adapter

    shutil.copytree(src, dst)
    make_adapter(dst / "big", model, r=16, alpha=16, seed=9)
    return dst
