"""What both command lines share: mistakes end as one `error: ...` line and exit status 2, never a traceback.

`ArgumentParser.error` is the one helper: argparse calls it for a bad flag or value, our own start-up
checks call `fail` (the same thing without a parser at hand). Status 2 is argparse's usage-error status.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from typing import NoReturn

from weightsync.limits import MAX_VERSION, version_problem

__all__ = ["MAX_VERSION", "ArgumentParser", "bind_problem", "fail", "port", "port_problem", "version"]

UINT64_MAX = (1 << 64) - 1  # the wire's version field
USAGE_ERROR = 2


def fail(message: object) -> NoReturn:
    """Prints `error: MESSAGE` on stderr as exactly one line and exits with status 2."""
    line = " ".join(str(message).split())  # a multi-line message (an OpenSSL or OS error) stays one line
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()
    raise SystemExit(USAGE_ERROR)


class ArgumentParser(argparse.ArgumentParser):
    """argparse without the usage block on a mistake: one `error: ...` line, status 2 (subparsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see `{self.prog} --help`)")


def _integer(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def port(text: str) -> int:
    """argparse type: a TCP port, 1..65535 (the kernel would otherwise take 99999 as 99999 mod 65536)."""
    value = _integer(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (1..65535)")
    return value


def version(text: str) -> int:
    """argparse type: a weight version, 1..MAX_VERSION (0 is what a rollout reports before any commit)."""
    value = _integer(text)
    if value > UINT64_MAX:
        raise argparse.ArgumentTypeError(f"versions are 64-bit: at most {MAX_VERSION}, got {text}")
    if problem := version_problem(value):
        raise argparse.ArgumentTypeError(problem)
    return value


def bind_problem(host: str, port: int, error: OSError, flag: str = "--port") -> str:
    """A one-line reason why listening on HOST:PORT failed, naming the flag that chose the port."""
    where = f"port {port} on {host}"
    if error.errno == errno.EADDRINUSE:
        return f"{where} is already in use (another rollout or program listens there): stop it or pick another {flag}"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: {host} is not an address of this machine (--host)"
    if error.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges)"
    return f"cannot listen on {where}: {error.strerror or error}"


def port_problem(host: str, port: int, flag: str = "--port") -> str | None:
    """Why HOST:PORT cannot be listened on right now, or None if it can.

    Probes with a plain socket (SO_REUSEADDR, never SO_REUSEPORT), so a port that any other process listens
    on, a rollout included, is reported as in use. A cheap check before a slow engine boot; the server's own
    bind (with SO_REUSEPORT off) is what makes it safe against a race.
    """
    if host.startswith("unix:"):
        return None
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        return f"cannot listen on {host}:{port}: cannot resolve {host!r} ({error.strerror})"
    problems: list[str] = []
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    return bind_problem(host, port, error, flag)
                problems.append(bind_problem(host, port, error, flag))
    # A name with several addresses (localhost: 127.0.0.1 and ::1) serves if any of them binds.
    return problems[0] if problems and len(problems) == len(addresses) else None
