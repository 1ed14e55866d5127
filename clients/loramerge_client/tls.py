"""Channel security: TLS (server-authenticated or mutual) and the bearer token sent as metadata."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

# Merged adapters arrive in ~1 MiB chunks; leave room for larger ones from other servers.
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    ("grpc.max_receive_message_length", 64 * 2**20),
    ("grpc.max_send_message_length", 64 * 2**20),
    # grpc's own reconnect backoff grows to 120 s; capped, a restarted server is found within the
    # retry budget (retry.RetryPolicy) instead of after it.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


@dataclass(frozen=True)
class TlsOptions:
    """PEM bytes for a TLS channel. All empty = TLS with the system's root certificates.

    ``server_name`` overrides the name checked against the server certificate (useful when
    connecting by IP to a certificate issued for a DNS name).
    """

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
    ) -> TlsOptions:
        """Read PEM files; ``cert`` and ``key`` together enable mutual TLS."""
        if (cert is None) != (key is None):
            raise ValueError("a client certificate needs its key and a key needs its certificate")

        def read(p: str | Path | None) -> bytes | None:
            return None if p is None else Path(p).read_bytes()

        return cls(read(ca), read(key), read(cert), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


TlsLike = TlsOptions | bool | None


def _resolve(tls: TlsLike) -> TlsOptions | None:
    if tls is True:
        return TlsOptions()
    return tls or None


def _options(tls: TlsOptions | None, options: Sequence[tuple[str, int | str]]) -> list:
    return [*DEFAULT_CHANNEL_OPTIONS, *(tls.channel_options() if tls else []), *options]


def open_channel(address: str, tls: TlsLike = None, options: Sequence = ()) -> grpc.Channel:
    """A blocking channel: plaintext when ``tls`` is None/False, else TLS."""
    resolved = _resolve(tls)
    if resolved is None:
        return grpc.insecure_channel(address, options=_options(None, options))
    return grpc.secure_channel(address, resolved.credentials(), options=_options(resolved, options))


def open_aio_channel(address: str, tls: TlsLike = None, options: Sequence = ()) -> grpc.aio.Channel:
    """An asyncio channel: plaintext when ``tls`` is None/False, else TLS."""
    resolved = _resolve(tls)
    if resolved is None:
        return grpc.aio.insecure_channel(address, options=_options(None, options))
    return grpc.aio.secure_channel(address, resolved.credentials(), options=_options(resolved, options))


def call_metadata(token: str | None, metadata: Sequence[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
    """Metadata sent with every call: ``authorization: Bearer <token>`` plus any extra pairs."""
    extra = tuple((k.lower(), v) for k, v in metadata)
    return ((("authorization", f"Bearer {token}"),) if token else ()) + extra
