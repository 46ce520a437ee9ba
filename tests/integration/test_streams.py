"""Parallel PushChunks streams and out-of-order chunks, over real gRPC on loopback."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from trainer_side.publisher import Publisher
from trainer_side.train import new_model
from weightsync.errors import Reason, reason_of
from weightsync.manifest import manifest_of_state
from weightsync.v1 import weightsync_pb2 as pb

import raw
from conftest import LoopThread, Rollout, start_rollout

PROBE = pb.GenerateRequest(prompt="the cat sat", max_tokens=8)


def _push_concurrently(rollout: Rollout, streams: list[list[bytes]]) -> int:
    """Sends each list of chunk messages on its own PushChunks stream, all at once."""
    answers: list[pb.PushChunksResponse] = []
    errors: list[BaseException] = []

    def send(messages: list[bytes]) -> None:
        try:
            answers.append(raw.push_chunks(rollout.channel, messages))
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)

    threads = [threading.Thread(target=send, args=(m,)) for m in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return sum(a.bytes for a in answers)


@pytest.mark.parametrize("streams", [2, 3])
def test_parallel_streams_commit_the_same_weights(rollout: Rollout, trained_state, streams: int) -> None:  # type: ignore[no-untyped-def]
    manifest = manifest_of_state(trained_state)
    with Publisher([rollout.address], progress=False, streams=streams, chunk_bytes=64 << 10) as publisher:
        [result] = publisher.push(trained_state, 1)
    assert result.ok, result.error
    assert (result.fingerprint, result.bytes_sent) == (manifest.fingerprint, manifest.total_bytes)
    answer = rollout.generate.Generate(PROBE, timeout=30)
    # The same weights sent over one stream answer the same tokens.
    with Publisher([rollout.address], progress=False, streams=1) as publisher:
        [again] = publisher.push(trained_state, 2)
    assert again.ok and again.fingerprint == result.fingerprint
    assert list(rollout.generate.Generate(PROBE, timeout=30).token_ids) == list(answer.token_ids)


def test_fan_out_with_parallel_streams(loop_thread: LoopThread, model_dir: Path, trained_state) -> None:  # type: ignore[no-untyped-def]
    rollouts = [start_rollout(loop_thread, model_dir) for _ in range(2)]
    try:
        with Publisher([r.address for r in rollouts], progress=False, streams=2, chunk_bytes=32 << 10) as publisher:
            results = publisher.push(trained_state, 1)
        assert all(r.ok for r in results), [r.line() for r in results]
        assert len({r.fingerprint for r in results}) == 1
    finally:
        for r in rollouts:
            r.channel.close()
            loop_thread.run(r.server.stop(grace=0))


def test_chunks_in_reverse_order_on_two_streams(rollout: Rollout, trained_state) -> None:  # type: ignore[no-untyped-def]
    tensors, manifest = raw.prepare(trained_state)
    update_id = raw.begin(rollout.weight_sync, 1, manifest, chunk_bytes=16 << 10).update_id
    chunks = raw.encoded_chunks(update_id, tensors, manifest, chunk_bytes=16 << 10)[::-1]
    sent = _push_concurrently(rollout, [chunks[0::2], chunks[1::2]])
    assert sent == manifest.total_bytes
    answer = rollout.weight_sync.Commit(pb.CommitRequest(update_id=update_id), timeout=10)
    assert (answer.weight_version, answer.fingerprint) == (1, manifest.fingerprint)


def test_wrong_bytes_out_of_order_are_refused_at_commit(rollout: Rollout, trained_state, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _, manifest = raw.prepare(trained_state)
    other, _ = raw.prepare(new_model(model_dir, seed=7).state_dict())
    update_id = raw.begin(rollout.weight_sync, 1, manifest, chunk_bytes=16 << 10).update_id
    chunks = raw.encoded_chunks(update_id, other, manifest, chunk_bytes=16 << 10)
    _push_concurrently(rollout, [chunks[len(chunks) // 2 :], chunks[: len(chunks) // 2]])
    with pytest.raises(grpc.RpcError) as info:
        rollout.weight_sync.Commit(pb.CommitRequest(update_id=update_id), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(info.value) == Reason.CHECKSUM_MISMATCH, info.value.details()


def test_streams_must_be_positive() -> None:
    with pytest.raises(ValueError, match="streams"):
        Publisher(["127.0.0.1:1"], streams=0)
