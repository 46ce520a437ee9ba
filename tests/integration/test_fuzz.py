"""Hostile bytes at every WeightSync method of a live rollout: a clear status each time, nothing served changes."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer_side.publisher import Publisher
from weightsync import wire
from weightsync.v1 import weightsync_pb2 as pb

import raw
from conftest import Rollout

# Statuses a hostile request may get; INTERNAL or UNKNOWN would mean an unhandled crash.
CLEAR = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.ABORTED,
}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def target(loop_thread, model_dir, trained_state):  # type: ignore[no-untyped-def]
    """One rollout serving version 1 for the whole module (hypothesis runs many examples against it)."""
    from conftest import start_rollout

    rollout = start_rollout(loop_thread, model_dir)
    with Publisher([rollout.address], progress=False) as publisher:
        assert publisher.push(trained_state, 1)[0].ok
    yield rollout
    rollout.channel.close()
    loop_thread.run(rollout.server.stop(grace=0))


def unary(rollout: Rollout, method: str):  # type: ignore[no-untyped-def]
    return rollout.channel.unary_unary(
        f"/weightsync.v1.WeightSync/{method}", request_serializer=None, response_deserializer=None
    )


def still_serving(rollout: Rollout) -> None:
    status = rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)
    assert status.weight_version == 1 and status.state in (pb.ROLLOUT_STATE_SERVING, pb.ROLLOUT_STATE_RECEIVING)
    assert rollout.generate.Generate(pb.GenerateRequest(prompt="red", max_tokens=2), timeout=30).weight_version == 1


def outcome(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        call()
    except grpc.RpcError as error:
        assert error.code() in CLEAR, (error.code(), error.details())
        return error.code()
    return grpc.StatusCode.OK


def drop_update(rollout: Rollout) -> None:
    update_id = rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5).update_id
    if update_id:
        rollout.weight_sync.AbortUpdate(pb.AbortUpdateRequest(update_id=update_id), timeout=5)


@FUZZ
@given(payload=st.binary(max_size=4096), method=st.sampled_from(["BeginUpdate", "Commit", "AbortUpdate"]))
def test_random_bytes_to_unary_methods(target: Rollout, payload: bytes, method: str) -> None:
    code = outcome(lambda: unary(target, method)(payload, timeout=10))
    if code == grpc.StatusCode.OK:
        drop_update(target)  # random bytes that parse as an acceptable (empty-ish) request
    still_serving(target)


@FUZZ
@given(messages=st.lists(st.binary(max_size=2048), max_size=8))
def test_random_bytes_as_chunks(target: Rollout, messages: list[bytes]) -> None:
    outcome(lambda: raw.push_chunks(target.channel, messages))
    still_serving(target)


@FUZZ
@given(
    mutation=st.sampled_from(["offset", "byte_size", "shape", "total", "dtype", "checksum", "duplicate", "drop"]),
    index=st.integers(0, 49),
    value=st.integers(0, 2**64 - 1),
)
def test_malformed_manifests(target: Rollout, trained_state, mutation: str, index: int, value: int) -> None:  # type: ignore[no-untyped-def]
    _, manifest = raw.prepare(trained_state)
    message = wire.manifest_to_proto(manifest)
    spec = message.tensors[index % len(message.tensors)]
    if mutation == "offset":
        spec.offset = value
    elif mutation == "byte_size":
        spec.byte_size = value
    elif mutation == "shape":
        spec.shape.append(value)
    elif mutation == "total":
        message.total_bytes = value
    elif mutation == "dtype":
        spec.dtype = value % 8  # type: ignore[assignment]
    elif mutation == "checksum":
        spec.checksum = f"xxh3_128:{value:032x}"[:41]
    elif mutation == "duplicate":
        message.tensors.append(spec)
    else:
        del message.tensors[index % len(message.tensors)]
    request = pb.BeginUpdateRequest(version=2, manifest=message, chunk_bytes=raw.CHUNK)
    code = outcome(lambda: target.weight_sync.BeginUpdate(request, timeout=10))
    if code == grpc.StatusCode.OK:
        # Only a no-op or a checksum change keeps a manifest valid; its bytes could then never verify.
        assert mutation == "checksum" or message == wire.manifest_to_proto(manifest)
        drop_update(target)
    still_serving(target)


@FUZZ
@given(
    index=st.integers(0, 2**64 - 1),
    size=st.integers(0, 600_000),
    checksum=st.integers(0, 2**64 - 1),
)
def test_misplaced_or_oversized_chunks(target: Rollout, trained_state, index: int, size: int, checksum: int) -> None:  # type: ignore[no-untyped-def]
    _, manifest = raw.prepare(trained_state)
    drop_update(target)
    update_id = raw.begin(target.weight_sync, 2, manifest).update_id
    message = pb.PushChunksRequest(update_id=update_id, index=index, checksum=checksum, data=bytes(size))
    assert outcome(lambda: raw.push_chunks(target.channel, [message.SerializeToString()])) != grpc.StatusCode.OK
    drop_update(target)
    still_serving(target)
