"""A rollout in a child process: what the demo, benchmarks and tests launch, and how they stop it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from weightsync.channel import listening, open_channel
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

__all__ = ["RolloutProcess", "free_port", "serve_command", "wait_until_up"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(
    model: Path, *, engine: str = "torch", host: str | None = None, port: int | None = None, args: Sequence[str] = ()
) -> list[str]:
    """`python -m rollout_side serve` with these options, as an argv list (the CLI's defaults where None)."""
    command = [sys.executable, "-m", "rollout_side", "serve", "--engine", engine, "--model", str(model)]
    if host is not None:
        command += ["--host", host]
    if port is not None:
        command += ["--port", str(port)]
    return [*command, *args]


def wait_until_up(address: str, timeout: float = 120.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """Blocks until the rollout at `address` answers GetStatus (even with an auth refusal).

    Its port is probed with plain connects first (`listening`): a gRPC channel that failed to connect
    backs off, and would notice a rollout that starts to listen up to a second late.
    """
    deadline = time.monotonic() + timeout
    with open_channel(address) as channel:
        stub = pb_grpc.WeightSyncStub(channel)
        while True:
            if listening(address):
                try:
                    stub.GetStatus(pb.GetStatusRequest(), timeout=2)
                    return
                except grpc.RpcError as error:
                    if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                        return
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"rollout {address} exited with {process.returncode} while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"rollout {address} did not come up within {timeout:.0f} s")
            time.sleep(0.02)


class RolloutProcess:
    """`python -m rollout_side serve` on a free loopback port (or a Unix socket), up when constructed."""

    def __init__(
        self,
        model: Path,
        *,
        engine: str = "torch",
        args: Sequence[str] = (),
        port: int | None = None,
        unix: bool = False,
        log: Path | None = None,
        timeout: float = 300.0,
    ) -> None:
        port = port or free_port()
        # The CLI listens on f"{host}:{port}": for a unix: host that is the socket's path.
        host = "unix:" + os.path.join(tempfile.mkdtemp(prefix="ws-rollout-"), "rollout.sock") if unix else "127.0.0.1"
        self.address = f"{host}:{port}"
        command = serve_command(model, engine=engine, host=host, port=port, args=args)
        sink = log.open("a") if log else subprocess.DEVNULL
        self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT if log else None)
        self.pid = self.process.pid
        self.port = port
        try:
            wait_until_up(self.address, timeout=timeout, process=self.process)
        except BaseException:
            self.kill()
            raise

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful), then SIGKILL if it does not exit in time; returns the exit code."""
        self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int:
        self.process.kill()
        return self.process.wait()

    def __enter__(self) -> RolloutProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
