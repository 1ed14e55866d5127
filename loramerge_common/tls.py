"""TLS and mutual TLS credentials from PEM files.

Server: a certificate and key; with a client CA, clients must present a certificate signed by it
(mutual TLS). Client: the CA that signed the server's certificate, plus a certificate and key of
its own when the server requires one.
"""

from __future__ import annotations

from pathlib import Path

import grpc


def _read(path: Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None = None
) -> grpc.ServerCredentials | None:
    """None when neither cert nor key is given (plaintext); ValueError when only one of them is."""
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError("a TLS client CA needs a server certificate and key (tls_cert, tls_key)")
        return None
    if cert is None or key is None:
        raise ValueError(f"TLS needs both a certificate and a key, got cert={cert} key={key}")
    ca = _read(client_ca)
    return grpc.ssl_server_credentials(
        [(_read(key), _read(cert))], root_certificates=ca, require_client_auth=ca is not None
    )


def channel_credentials(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """Client credentials: ``ca`` None uses the system roots; cert/key for mutual TLS."""
    if (cert is None) != (key is None):
        raise ValueError(f"a TLS client certificate needs its key, got cert={cert} key={key}")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert)
    )
