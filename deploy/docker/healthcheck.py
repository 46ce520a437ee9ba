#!/usr/bin/env python3
"""gRPC health check for exec probes: `weightsync-healthcheck [--service NAME] [--tls-ca F ...]`.

Kubelet's built-in `grpc:` probe connects in plaintext and cannot present a client certificate, so a
rollout serving TLS or mutual TLS is probed with this instead. Exit status: 0 when the service is
SERVING, 1 when it answers anything else, 2 when it cannot be reached or the call fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SERVING, NOT_SERVING, UNREACHABLE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weightsync-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1:50051", help="HOST:PORT (default: %(default)s)")
    parser.add_argument("--service", default="", help='service to check; "" is the process (default)')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds for connect and call together")
    parser.add_argument("--tls-ca", type=Path, help="CA that signed the server's certificate: turns TLS on")
    parser.add_argument("--tls-cert", type=Path, help="client certificate, for servers that require mTLS")
    parser.add_argument("--tls-key", type=Path, help="client key, with --tls-cert")
    parser.add_argument("--server-name", help="name to verify the server's certificate against, if not the host")
    return parser


def check(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if (args.tls_cert is None) != (args.tls_key is None):
        print("--tls-cert and --tls-key go together", file=sys.stderr)
        return UNREACHABLE
    if args.tls_ca is None and args.tls_cert is None:
        channel = grpc.insecure_channel(args.addr)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=args.tls_ca.read_bytes() if args.tls_ca else None,
            private_key=args.tls_key.read_bytes() if args.tls_key else None,
            certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None,
        )
        options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
        channel = grpc.secure_channel(args.addr, credentials, options=options)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"{args.addr} {args.service!r}: {error.code().name}: {error.details()}", file=sys.stderr)
            return UNREACHABLE
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{args.addr} {args.service!r}: {status}")
    return SERVING if response.status == health_pb2.HealthCheckResponse.SERVING else NOT_SERVING


def main(argv: list[str] | None = None) -> int:
    return check(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
