"""Faults over real processes and sockets: killed rollouts, cut connections, stalled trainers, shutdown."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from rollout_side.process import RolloutProcess
from trainer_side.publisher import Publisher
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

import raw
from conftest import Rollout

FAST_REAP = ["--idle-timeout", "3"]


def status(address: str) -> pb.GetStatusResponse:
    return pb_grpc.WeightSyncStub(grpc.insecure_channel(address)).GetStatus(pb.GetStatusRequest(), timeout=5)


def generate(address: str) -> pb.GenerateResponse:
    stub = pb_grpc.GenerateStub(grpc.insecure_channel(address))
    return stub.Generate(pb.GenerateRequest(prompt="the cat", max_tokens=4), timeout=30)


def wait_no_update(address: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while status(address).update_id:
        assert time.monotonic() < deadline, "the rollout kept a dead update open"
        time.sleep(0.1)


class CuttingProxy:
    """Forwards TCP both ways, and cuts the connection once `cut_after` bytes went to the server."""

    def __init__(self, target: str, cut_after: int) -> None:
        self.target = target
        self.cut_after = cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        host, port = self.target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        threading.Thread(target=self._pipe, args=(upstream, client, None), daemon=True).start()
        self._pipe(client, upstream, self.cut_after)

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: limit - sent])  # the middle of a chunk, then nothing
                    self.cut.set()
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@pytest.fixture
def serving(rollout: Rollout, trained_state) -> Iterator[Rollout]:  # type: ignore[no-untyped-def]
    with Publisher([rollout.address], progress=False) as publisher:
        assert publisher.push(trained_state, 1)[0].ok
    yield rollout


def test_connection_cut_in_the_middle_of_a_chunk(serving: Rollout, trained_state) -> None:  # type: ignore[no-untyped-def]
    proxy = CuttingProxy(serving.address, cut_after=(2 << 20) + 12345)
    with Publisher([proxy.address], progress=False, timeout=10) as publisher:
        [result] = publisher.push(trained_state, 2)
    assert proxy.cut.is_set()
    assert not result.ok and result.error.split(":")[0] in ("UNAVAILABLE", "CANCELLED", "INTERNAL")
    wait_no_update(serving.address)
    assert status(serving.address).weight_version == 1 and generate(serving.address).weight_version == 1
    with Publisher([serving.address], progress=False) as publisher:
        assert publisher.push(trained_state, 2)[0].ok


def test_stalled_stream_is_dropped_after_the_idle_timeout(serving: Rollout, trained_state) -> None:  # type: ignore[no-untyped-def]
    tensors, manifest = raw.prepare(trained_state)
    update_id = raw.begin(serving.weight_sync, 2, manifest).update_id
    chunks = raw.encoded_chunks(update_id, tensors, manifest)
    release = threading.Event()

    def stalled() -> Iterator[bytes]:
        yield chunks[0]
        release.wait(60)  # a trainer that hangs, connection open, sending nothing

    call = serving.channel.stream_unary(
        "/weightsync.v1.WeightSync/PushChunks", request_serializer=None, response_deserializer=None
    ).future(stalled(), timeout=60)
    try:
        assert status(serving.address).update_id == update_id
        wait_no_update(serving.address, timeout=20)  # idle timeout is 3 s in tests
        assert generate(serving.address).weight_version == 1
        with Publisher([serving.address], progress=False) as publisher:
            assert publisher.push(trained_state, 3)[0].ok  # the stalled update no longer blocks anyone
    finally:
        release.set()
        call.cancel()


def test_rollout_killed_mid_commit_and_restarted(model_dir: Path, trained_state) -> None:  # type: ignore[no-untyped-def]
    rollout = RolloutProcess(model_dir, args=FAST_REAP)
    address = rollout.address
    try:
        with Publisher([address], progress=False) as publisher:
            assert publisher.push(trained_state, 1)[0].ok
        tensors, manifest = raw.prepare(trained_state)
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.WeightSyncStub(channel)
        update_id = raw.begin(stub, 2, manifest).update_id
        raw.push_chunks(channel, raw.encoded_chunks(update_id, tensors, manifest))
        commit = stub.Commit.future(pb.CommitRequest(update_id=update_id), timeout=30)
        rollout.kill()
        with pytest.raises(grpc.RpcError):
            commit.result()
    finally:
        rollout.kill()
    with RolloutProcess(model_dir, args=FAST_REAP, port=rollout.port):
        # Nothing survives a crash: the restarted rollout holds dummy weights and refuses Generate.
        assert (status(address).weight_version, status(address).state) == (0, pb.ROLLOUT_STATE_DUMMY)
        with pytest.raises(grpc.RpcError) as info:
            generate(address)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with Publisher([address], progress=False) as publisher:
            [result] = publisher.push(trained_state, 2)
        assert result.ok and generate(address).weight_version == 2


def test_graceful_shutdown_finishes_in_flight_generate(model_dir: Path, trained_state) -> None:  # type: ignore[no-untyped-def]
    rollout = RolloutProcess(model_dir, args=[*FAST_REAP, "--shutdown-grace", "60"])
    try:
        with Publisher([rollout.address], progress=False) as publisher:
            assert publisher.push(trained_state, 1)[0].ok
        stub = pb_grpc.GenerateStub(grpc.insecure_channel(rollout.address))
        request = pb.GenerateStreamRequest(request=pb.GenerateRequest(prompt="one two", max_tokens=40))
        stream = stub.GenerateStream(request, timeout=60)
        first = next(stream)
        rollout.process.send_signal(signal.SIGTERM)
        rest = list(stream)  # the in-flight stream completes within the grace period
        assert (rest[-1] if rest else first).finish_reason
        assert rollout.process.wait(30) == 0
    finally:
        rollout.kill()
