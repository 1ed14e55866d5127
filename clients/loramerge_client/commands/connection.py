"""Flags every networked subcommand shares: addresses, TLS, token, deadline; and the clients they make."""

from __future__ import annotations

import argparse
import os

from loramerge_client.client import DEFAULT_INFERENCE_ADDR, DEFAULT_MERGE_ADDR, InferenceClient, MergeClient
from loramerge_client.retry import NO_RETRY, RetryPolicy
from loramerge_client.tls import TlsOptions


def add_connection_options(parser: argparse.ArgumentParser, *, merge: bool, inference: bool) -> None:
    g = parser.add_argument_group("connection")
    if merge:
        g.add_argument(
            "--merge-addr",
            default=os.environ.get("MERGE_ADDR", DEFAULT_MERGE_ADDR),
            help="merge service host:port [env MERGE_ADDR; default %(default)s]",
        )
    if inference:
        g.add_argument(
            "--inference-addr",
            default=os.environ.get("INFERENCE_ADDR", DEFAULT_INFERENCE_ADDR),
            help="inference service host:port [env INFERENCE_ADDR; default %(default)s]",
        )
    g.add_argument(
        "--token",
        default=os.environ.get("LORAMERGE_TOKEN"),
        help="bearer token sent as 'authorization: Bearer TOKEN' [env LORAMERGE_TOKEN]",
    )
    g.add_argument("--tls", action="store_true", help="use TLS (system roots unless --tls-ca)")
    g.add_argument(
        "--tls-ca", metavar="PEM", help="CA bundle that signed the server certificate (implies --tls)"
    )
    g.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS (with --tls-key)")
    g.add_argument("--tls-key", metavar="PEM", help="client private key for mutual TLS")
    g.add_argument("--tls-server-name", metavar="NAME", help="name to verify in the server certificate")
    g.add_argument(
        "--timeout", type=float, default=120.0, help="deadline in seconds for the whole call [%(default)s]"
    )
    g.add_argument(
        "--retries", type=int, default=4, help="retries on UNAVAILABLE, with backoff [%(default)s]"
    )


def tls_options(args: argparse.Namespace) -> TlsOptions | None:
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name):
        return None
    return TlsOptions.from_files(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)


def _common(args: argparse.Namespace) -> dict:
    retry = NO_RETRY if args.retries <= 0 else RetryPolicy(max_attempts=args.retries + 1)
    return {"tls": tls_options(args), "token": args.token, "timeout": args.timeout, "retry": retry}


def merge_client(args: argparse.Namespace) -> MergeClient:
    return MergeClient(args.merge_addr, **_common(args))


def inference_client(args: argparse.Namespace) -> InferenceClient:
    return InferenceClient(args.inference_addr, **_common(args))
