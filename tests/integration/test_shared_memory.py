"""The shared-memory transport for co-located pods: a file instead of chunks, the same handshake and checks."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from rollout_side.update import version_file
from trainer_side.publisher import Publisher
from trainer_side.train import greedy, new_model
from weightsync.errors import Reason, reason_of
from weightsync.manifest import manifest_of_state, tensor_bytes
from weightsync.v1 import weightsync_pb2 as pb

import raw
from conftest import ROOT, LoopThread, Rollout, reference_model, start_rollout

PROMPTS = ["the cat sat", "one two three", "red orange"]


@pytest.fixture
def shm(tmp_path: Path) -> Path:
    """Stands in for a /dev/shm (or memory-backed emptyDir) both sides mount."""
    directory = tmp_path / "shm"
    directory.mkdir()
    return directory


@pytest.fixture
def colocated(loop_thread: LoopThread, model_dir: Path, shm: Path) -> Iterator[Rollout]:
    r = start_rollout(loop_thread, model_dir, shared_memory_dir=shm)
    yield r
    r.channel.close()
    loop_thread.run(r.server.stop(grace=0))


def test_push_through_a_shared_file_equals_transformers(colocated, shm, model_dir, tokenizer, trained_state) -> None:  # type: ignore[no-untyped-def]
    with Publisher([colocated.address], progress=False, shared_memory=shm) as publisher:
        [result] = publisher.push(trained_state, version=3)
        assert result.ok, result.error
        assert result.fingerprint == manifest_of_state(trained_state).fingerprint
        assert [p.name for p in shm.iterdir()] == [publisher._shared.path.name]  # type: ignore[union-attr]
        # Versions keep coming through the same file.
        bumped = {k: v + 1 if k.endswith("norm.weight") else v for k, v in trained_state.items()}
        [again] = publisher.push(bumped, version=4)
        assert again.ok and again.fingerprint == manifest_of_state(bumped).fingerprint
        [back] = publisher.push(trained_state, version=5)
        assert back.ok
    assert not list(shm.iterdir()), "the publisher removes its file on close"
    reference = reference_model(model_dir, trained_state)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer = colocated.generate.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=12), timeout=30)
        assert (list(answer.token_ids), answer.weight_version) == (greedy(reference, ids, 12), 5), prompt


def _begin_from_file(
    rollout: Rollout,
    state: dict[str, torch.Tensor],
    path: Path,
    version: int = 2,
    contents: dict[str, torch.Tensor] | None = None,
    streamed: bool = False,
) -> str:
    """Writes `contents` (default: `state`) to `path` and begins `state`'s version from it (`streamed`: as a
    file still being written, read as far as PushChunks announces)."""
    _, manifest = raw.prepare(state)
    tensors, _ = raw.prepare(contents if contents is not None else state)
    path.write_bytes(b"".join(tensor_bytes(t).tobytes() for t in tensors))
    request = pb.BeginUpdateRequest(
        version=version,
        manifest=raw.wire.manifest_to_proto(manifest),
        chunk_bytes=raw.CHUNK,
        fingerprint=manifest.fingerprint,
        shared_memory_file=str(path),
        shared_memory_streamed=streamed,
    )
    return rollout.weight_sync.BeginUpdate(request, timeout=10).update_id


def _begin_streamed(rollout: Rollout, state: dict[str, torch.Tensor], path: Path, version: int = 2) -> tuple[str, int]:
    """Begins `state` as a streamed file; returns (update id, the file's size)."""
    update_id = _begin_from_file(rollout, state, path, version, streamed=True)
    return update_id, raw.prepare(state)[1].total_bytes


def _progress(update_id: str, *marks: int) -> list[bytes]:
    return [raw.wire.encode_file_progress(update_id.encode(), m) for m in marks]


def _served(rollout: Rollout, state: dict[str, torch.Tensor]) -> str:
    with Publisher([rollout.address], progress=False) as publisher:  # over the socket
        [result] = publisher.push(state, 1)
    assert result.ok
    return result.fingerprint


def _assert_still(rollout: Rollout, fingerprint: str) -> None:
    status = rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)
    assert (status.weight_version, status.fingerprint, status.update_id) == (1, fingerprint, "")
    assert rollout.generate.Generate(pb.GenerateRequest(prompt="the cat", max_tokens=4), timeout=30).weight_version == 1


def test_a_delta_publisher_sends_newcomers_the_full_version_through_the_file(  # type: ignore[no-untyped-def]
    loop_thread, colocated, shm, model_dir, trained_state, caplog
) -> None:
    """Beside a delta to the rollout that holds the base, a newcomer gets the full version, whose checksums
    the diff already computed, through the file (written without hashing it again)."""
    newcomer = start_rollout(loop_thread, model_dir, shared_memory_dir=shm)
    try:
        with Publisher([colocated.address], progress=False, delta=True, shared_memory=shm) as publisher:
            [first] = publisher.push(trained_state, version=2)
            assert first.ok and not first.delta
            publisher.set_rollouts([newcomer.address], [])
            bumped = {k: v + 1 if k.endswith("norm.weight") else v for k, v in trained_state.items()}
            with caplog.at_level(logging.INFO, logger="trainer_side.publisher"):
                results = {r.address: r for r in publisher.push(bumped, version=3)}
        assert all(r.ok for r in results.values()), [r.line() for r in results.values()]
        assert results[colocated.address].delta and not results[newcomer.address].delta
        expected = manifest_of_state(bumped).fingerprint
        assert {r.fingerprint for r in results.values()} == {expected}
        assert "to 1 rollout(s) through the shared-memory file" in caplog.text
        status = newcomer.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)
        assert (status.weight_version, status.fingerprint) == (3, expected)
    finally:
        newcomer.channel.close()
        loop_thread.run(newcomer.server.stop(grace=0))


def test_a_rollout_reads_files_only_where_it_was_told(rollout, colocated, shm, tmp_path, trained_state) -> None:  # type: ignore[no-untyped-def]
    fingerprints: dict[int, str] = {}
    for target, path in [
        (rollout, shm / "v.bin"),
        (colocated, tmp_path / "elsewhere.bin"),
        (colocated, shm / ".." / "elsewhere.bin"),
    ]:
        fingerprint = fingerprints.get(id(target)) or fingerprints.setdefault(
            id(target), _served(target, trained_state)
        )
        with pytest.raises(grpc.RpcError) as info:
            _begin_from_file(target, trained_state, path)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
        assert reason_of(info.value) == Reason.SHARED_MEMORY_REFUSED, info.value.details()
        _assert_still(target, fingerprint)
    (shm / "link.bin").symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(grpc.RpcError) as info:
        _begin_from_file(colocated, trained_state, shm / "link.bin")
    assert reason_of(info.value) == Reason.SHARED_MEMORY_REFUSED, info.value.details()


def test_a_short_or_tampered_file_changes_nothing(colocated, shm, model_dir, trained_state) -> None:  # type: ignore[no-untyped-def]
    fingerprint = _served(colocated, trained_state)
    other = new_model(model_dir, seed=5).state_dict()
    path = shm / "v.bin"
    update_id = _begin_from_file(colocated, trained_state, path, contents=other)  # other bytes, this manifest
    path.write_bytes(b"")  # rewritten after the rollout copied it: too late to matter
    _, manifest = raw.prepare(trained_state)
    request = pb.BeginUpdateRequest(
        version=3,
        manifest=raw.wire.manifest_to_proto(manifest),
        chunk_bytes=raw.CHUNK,
        shared_memory_file=str(path),
    )
    with pytest.raises(grpc.RpcError) as info:  # one update at a time: the first is still open
        colocated.weight_sync.BeginUpdate(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.ABORTED
    with pytest.raises(grpc.RpcError) as info:
        colocated.weight_sync.Commit(pb.CommitRequest(update_id=update_id), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(info.value) == Reason.CHECKSUM_MISMATCH, info.value.details()
    _assert_still(colocated, fingerprint)
    with pytest.raises(grpc.RpcError) as info:  # an empty file for a whole model
        colocated.weight_sync.BeginUpdate(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS, info.value.details()
    assert reason_of(info.value) == Reason.CHUNK_CORRUPT
    _assert_still(colocated, fingerprint)


def test_a_file_cut_short_while_it_is_read_changes_nothing(colocated, shm, trained_state, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The file is read with pread, not mapped: a writer that truncates it mid-read is refused, not a SIGBUS."""
    fingerprint = _served(colocated, trained_state)
    path = shm / "v.bin"
    monkeypatch.setattr(version_file, "BLOCK", 64 << 10)  # several blocks for the tiny model
    cut: list[int] = []

    async def sleep(delay: float, *args: object) -> None:  # the receiver yields between blocks: cut the file there
        if not cut:
            cut.append(path.stat().st_size)
            os.truncate(path, 100_000)
        await asyncio.sleep(delay)

    monkeypatch.setattr(version_file, "asyncio", types.SimpleNamespace(**{**vars(asyncio), "sleep": sleep}))
    with pytest.raises(grpc.RpcError) as info:
        _begin_from_file(colocated, trained_state, path)
    assert cut and cut[0] > 100_000
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert reason_of(info.value) == Reason.CHUNK_CORRUPT, info.value.details()
    _assert_still(colocated, fingerprint)


def test_push_command_through_a_shared_file(colocated, shm, trained_checkpoint, trained_state) -> None:  # type: ignore[no-untyped-def]
    command = [sys.executable, "-m", "trainer_side", "push", "--checkpoint", str(trained_checkpoint)]
    command += ["--version", "4", "--rollouts", colocated.address, "--shared-memory", str(shm)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "version 4 committed" in done.stdout
    status = colocated.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)
    assert (status.weight_version, status.fingerprint) == (4, manifest_of_state(trained_state).fingerprint)
    assert not list(shm.iterdir())


def test_train_command_through_a_shared_file(colocated, shm, model_dir) -> None:  # type: ignore[no-untyped-def]
    """The demo trainer of the co-located Kubernetes example: every step through the file, answers checked."""
    command = [sys.executable, "-m", "trainer_side", "train", "--model", str(model_dir), "--steps", "2"]
    command += ["--rollouts", colocated.address, "--shared-memory", str(shm), "--log-level", "INFO"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("== trainer") == 2, done.stdout
    assert done.stderr.count("through the shared-memory file") == 2, done.stderr
    status = colocated.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)
    assert status.weight_version == 2
    assert not list(shm.iterdir())


def test_a_streamed_file_is_read_as_far_as_it_is_announced(colocated, shm, trained_state) -> None:  # type: ignore[no-untyped-def]
    _served(colocated, trained_state)
    bumped = {k: v + 1 if k.endswith("norm.weight") else v for k, v in trained_state.items()}
    update_id, size = _begin_streamed(colocated, bumped, shm / "v.bin")
    half = raw.push_chunks(colocated.channel, _progress(update_id, size // 2))
    assert half.bytes == size // 2
    assert colocated.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5).received_bytes == size // 2
    rest = raw.push_chunks(colocated.channel, _progress(update_id, size // 2, size))
    assert rest.bytes == size - size // 2
    answer = colocated.weight_sync.Commit(pb.CommitRequest(update_id=update_id), timeout=10)
    plain = manifest_of_state(bumped, piece_bytes=0)  # the kind raw.prepare announces
    assert (answer.weight_version, answer.fingerprint) == (2, plain.fingerprint)


@pytest.mark.parametrize(
    ("marks", "chunks"),
    [(lambda size: [size // 2, size // 4], False), (lambda size: [size + 1], False), (lambda size: [], True)],
    ids=["backwards", "past-the-end", "chunks-instead"],
)
def test_a_streamed_file_refuses_bad_progress(colocated, shm, trained_state, marks, chunks) -> None:  # type: ignore[no-untyped-def]
    fingerprint = _served(colocated, trained_state)
    update_id, size = _begin_streamed(colocated, trained_state, shm / "v.bin")
    tensors, manifest = raw.prepare(trained_state)
    messages = raw.encoded_chunks(update_id, tensors, manifest) if chunks else _progress(update_id, *marks(size))
    with pytest.raises(grpc.RpcError) as info:
        raw.push_chunks(colocated.channel, messages)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS, info.value.details()
    assert reason_of(info.value) == Reason.CHUNK_CORRUPT
    _assert_still(colocated, fingerprint)


def test_progress_for_an_update_without_a_file_and_an_early_commit_are_refused(colocated, shm, trained_state) -> None:  # type: ignore[no-untyped-def]
    fingerprint = _served(colocated, trained_state)
    _, manifest = raw.prepare(trained_state)
    update_id = raw.begin(colocated.weight_sync, 2, manifest).update_id  # chunks, no file
    with pytest.raises(grpc.RpcError) as info:
        raw.push_chunks(colocated.channel, _progress(update_id, 1024))
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert reason_of(info.value) == Reason.CHUNK_CORRUPT, info.value.details()
    _assert_still(colocated, fingerprint)
    update_id, size = _begin_streamed(colocated, trained_state, shm / "v.bin", version=3)
    raw.push_chunks(colocated.channel, _progress(update_id, size // 2))
    with pytest.raises(grpc.RpcError) as info:
        colocated.weight_sync.Commit(pb.CommitRequest(update_id=update_id), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(info.value) == Reason.INCOMPLETE_UPDATE, info.value.details()
    _assert_still(colocated, fingerprint)
