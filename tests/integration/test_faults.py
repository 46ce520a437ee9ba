"""Faults over real processes and sockets: killed rollouts, cut connections, stalled trainers, shutdown."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from rollout_side.process import RolloutProcess
from trainer_side.publisher import Publisher
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

import raw
from conftest import LoopThread, Rollout, start_rollout
from proxy import Proxy


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


@pytest.fixture
def serving(rollout: Rollout, trained_state) -> Iterator[Rollout]:  # type: ignore[no-untyped-def]
    with Publisher([rollout.address], progress=False) as publisher:
        assert publisher.push(trained_state, 1)[0].ok
    yield rollout


@pytest.fixture
def fast_reaping(loop_thread: LoopThread, model_dir: Path, trained_state) -> Iterator[Rollout]:  # type: ignore[no-untyped-def]
    """A serving rollout that drops an update idle for 3 s: for the test of the idle reaper itself."""
    r = start_rollout(loop_thread, model_dir, idle_timeout=3.0)
    with Publisher([r.address], progress=False) as publisher:
        assert publisher.push(trained_state, 1)[0].ok
    yield r
    r.channel.close()
    loop_thread.run(r.server.stop(grace=0))


def test_connection_cut_in_the_middle_of_a_chunk(serving: Rollout, trained_state) -> None:  # type: ignore[no-untyped-def]
    """The same push() call reconnects, resumes with the chunks the rollout held, and returns ok."""
    proxy = Proxy(serving.address)
    proxy.cut_after((2 << 20) + 12345)
    with Publisher([proxy.address], progress=False, timeout=10) as publisher:
        [result] = publisher.push(trained_state, 2)
    assert proxy.cuts == 1
    assert result.ok, result.error
    assert result.reconnects == 1 and result.held_bytes >= 1 << 20, result
    assert status(serving.address).weight_version == 2 and generate(serving.address).weight_version == 2
    proxy.close()


def test_stalled_stream_is_dropped_after_the_idle_timeout(fast_reaping: Rollout, trained_state) -> None:  # type: ignore[no-untyped-def]
    serving = fast_reaping  # a live stream that sends nothing: only the idle timeout ends it
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
    rollout = RolloutProcess(model_dir)
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
    with RolloutProcess(model_dir, port=rollout.port):
        # Nothing survives a crash: the restarted rollout, its engine up, holds dummy weights and refuses
        # Generate. (It listens while the engine boots: wait for the boot, so that is what is checked.)
        deadline = time.monotonic() + 60
        while status(address).state == pb.ROLLOUT_STATE_BOOTING:
            assert time.monotonic() < deadline, "the restarted rollout's engine did not come up"
            time.sleep(0.05)
        assert (status(address).weight_version, status(address).state) == (0, pb.ROLLOUT_STATE_DUMMY)
        with pytest.raises(grpc.RpcError) as info:
            generate(address)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with Publisher([address], progress=False) as publisher:
            [result] = publisher.push(trained_state, 2)
        assert result.ok and generate(address).weight_version == 2


def test_a_long_lived_publisher_pushes_to_a_rollout_restarted_on_the_same_port(model_dir: Path, trained_state) -> None:  # type: ignore[no-untyped-def]
    """The publisher's channel saw its rollout die: its next push waits for the new process, bounded, and
    goes through, rather than failing at once with UNAVAILABLE while the channel backs off."""
    rollout = RolloutProcess(model_dir)
    with Publisher([rollout.address], progress=False) as publisher:
        try:
            assert publisher.push(trained_state, 1)[0].ok
        finally:
            rollout.kill()
        [down] = publisher.push(trained_state, 2)  # the training loop goes on: its channel now backs off
        assert not down.ok and down.code == grpc.StatusCode.UNAVAILABLE, down
        with RolloutProcess(model_dir, port=rollout.port):  # listening again when this returns
            [result] = publisher.push(trained_state, 2)
            assert result.ok, result.error
            assert status(rollout.address).weight_version == 2


def test_a_push_waits_for_a_rollout_that_comes_back(loop_thread: LoopThread, model_dir: Path, trained_state) -> None:  # type: ignore[no-untyped-def]
    """A push begun while its rollout is down (restarting) waits for the channel, bounded, and goes through
    once the rollout listens again on its port, 2 s later."""
    first = start_rollout(loop_thread, model_dir)
    port = first.server.port
    with Publisher([first.address], progress=False) as publisher:
        assert publisher.push(trained_state, 1)[0].ok
        first.channel.close()
        loop_thread.run(first.server.stop(grace=0))
        restarted: list[Rollout] = []
        timer = threading.Timer(2.0, lambda: restarted.append(start_rollout(loop_thread, model_dir, port=port)))
        timer.start()
        try:
            [result] = publisher.push(trained_state, 2)
        finally:
            timer.join()
        assert result.ok, result.error
    second = restarted[0]
    try:
        assert status(second.address).weight_version == 2
    finally:
        second.channel.close()
        loop_thread.run(second.server.stop(grace=0))


class _OutOfMemoryOnCopy(torch.Tensor):
    """A weight whose copy to the CPU fails, as a CUDA tensor's does when memory runs out mid-push."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.Tensor.to:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_tensor_that_fails_to_encode_fails_the_push_on_every_rollout(model_dir: Path, trained_state) -> None:  # type: ignore[no-untyped-def]
    """Mid-push (chunks of the tensors before it went out), plain, relayed and delta: a failed result per rollout
    naming the tensor and the cause, every rollout idle right after, the previous version still served."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        rollouts = list(pool.map(lambda _: RolloutProcess(model_dir), range(2)))
    addresses = [r.address for r in rollouts]
    name = "model.layers.1.mlp.down_proj.weight"
    broken = {**trained_state, name: trained_state[name].as_subclass(_OutOfMemoryOnCopy)}
    try:
        with Publisher(addresses, progress=False) as publisher:
            assert all(r.ok for r in publisher.push(trained_state, 1))
        for options in ({}, {"relay_fanout": 1}, {"delta": True}):  # delta: the base's copy fails, before any begin
            with Publisher(addresses, progress=False, **options) as publisher:  # type: ignore[arg-type]
                results = publisher.push(broken, 2)
            assert [r.address for r in results] == addresses
            for result in results:
                assert not result.ok and result.version == 2, result
                assert f"tensor {name!r} could not be encoded: OutOfMemoryError: CUDA out of memory" in result.error
            for address in addresses:
                now = status(address)
                assert now.state != pb.ROLLOUT_STATE_RECEIVING and not now.update_id, (options, now)
                assert now.weight_version == 1 and generate(address).weight_version == 1
    finally:
        for r in rollouts:
            r.kill()


def test_graceful_shutdown_finishes_in_flight_generate(model_dir: Path, trained_state) -> None:  # type: ignore[no-untyped-def]
    rollout = RolloutProcess(model_dir, args=["--shutdown-grace", "60"])
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
