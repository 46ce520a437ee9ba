"""Credentials both sides share: the bearer token and TLS material, read once at start-up."""

from __future__ import annotations

import argparse
import os
import ssl
from pathlib import Path

import grpc

__all__ = ["AUTH_ENV", "add_security_arguments", "channel_credentials", "load_token", "server_credentials"]

AUTH_ENV = "WEIGHTSYNC_AUTH_TOKEN"


def load_token(path: Path | None, env: str = AUTH_ENV, flag: str = "--auth-token-file") -> str | None:
    """The token from `path` if given, else from the environment; None means auth is off.

    Surrounding whitespace (a file's or a `$(cat file)`'s trailing newline) is stripped the same way from
    either source. A token must fit in gRPC metadata (printable ASCII): anything else is refused here, at
    start, rather than failing every call later.
    """
    if path is not None:
        source = f"{flag} {path}"
        _must_exist(flag, path)
        token = Path(path).read_text().strip()
    else:
        raw = os.environ.get(env)
        if not raw:
            return None  # unset or empty: auth off
        source = f"${env}"
        token = raw.strip()
    if not token:
        raise ValueError(f"{source} is empty" if path is not None else f"{source} is blank; unset it for no auth")
    for position, char in enumerate(token):
        if not " " <= char <= "~":
            raise ValueError(
                f"{source} holds a character gRPC metadata cannot carry (U+{ord(char):04X} at position {position}):"
                " tokens are printable ASCII"
            )
    return token


def check_key_pair(cert: Path, key: Path) -> None:
    """Refuses, naming the file, a --tls-cert that is no PEM certificate or a --tls-key that is not its key.

    gRPC itself only says "failed to bind" (or fails every handshake) for these.
    """
    _must_exist("--tls-cert", cert)
    _must_exist("--tls-key", key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key, password=lambda: b"")  # an encrypted key fails instead of prompting
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"--tls-key {key} is not the private key of --tls-cert {cert}") from None
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
        except ssl.SSLError:
            raise ValueError(f"--tls-cert {cert} holds no PEM certificate") from None
        raise ValueError(f"--tls-key {key} holds no unencrypted PEM private key (for --tls-cert {cert})") from None


def check_ca(ca: Path) -> None:
    """Refuses a --tls-ca that holds no PEM certificate, naming the file."""
    _must_exist("--tls-ca", ca)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=ca)
    except ssl.SSLError as error:
        raise ValueError(f"--tls-ca {ca} holds no PEM CA certificate ({error.reason or error})") from None


def _must_exist(flag: str, path: Path) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS for the server; with `client_ca`, clients must present a certificate it signed (mTLS)."""
    check_key_pair(cert, key)
    if client_ca:
        check_ca(client_ca)
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
    if cert is not None and key is not None:
        check_key_pair(cert, key)
    if ca:
        check_ca(ca)
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
