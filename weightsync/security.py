"""Credentials both sides share: the bearer token and TLS material, read once at start-up."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import grpc

__all__ = ["AUTH_ENV", "add_security_arguments", "channel_credentials", "load_token", "server_credentials"]

AUTH_ENV = "WEIGHTSYNC_AUTH_TOKEN"


def load_token(path: Path | None, env: str = AUTH_ENV) -> str | None:
    """The token from `path` if given, else from the environment; None means auth is off."""
    if path is not None:
        token = Path(path).read_text().strip()
        if not token:
            raise ValueError(f"auth token file {path} is empty")
        return token
    return os.environ.get(env) or None


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS for the server; with `client_ca`, clients must present a certificate it signed (mTLS)."""
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=Path(client_ca).read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS for a client: `ca` verifies the server, `cert`/`key` identify us for mTLS."""
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )


def add_security_arguments(parser: argparse.ArgumentParser, *, server: bool) -> None:
    """The auth and TLS flags, spelled the same on both sides."""
    parser.add_argument(
        "--auth-token-file",
        type=Path,
        help=f"file holding the bearer token for the weight path (default: ${AUTH_ENV}; unset = no auth)",
    )
    if server:
        parser.add_argument(
            "--generate-token-file", type=Path, help="also require a bearer token on Generate (default: open)"
        )
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate: the server's, or the client's for mTLS")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-ca",
        type=Path,
        help="PEM CA: on the server, clients must present a certificate it signed (mTLS); "
        "on the client, verifies the server",
    )
