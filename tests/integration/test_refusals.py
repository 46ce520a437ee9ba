"""Every bad input is refused with a specific status, and what Generate serves never changes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
import torch

from trainer_side.publisher import Publisher
from trainer_side.train import new_model
from weightsync.errors import Reason, metadata_of, reason_of
from weightsync.manifest import PIECE_BYTES, Manifest, build_manifest
from weightsync.v1 import weightsync_pb2 as pb

import raw
from conftest import ROOT, Rollout

PROBE = pb.GenerateRequest(prompt="the cat sat", max_tokens=8)


@dataclass
class Served:
    rollout: Rollout
    state: dict[str, torch.Tensor]
    fingerprint: str
    answer: list[int]

    def assert_unchanged(self, receiving: bool = False) -> None:
        """Version 1 still served; no update left in progress unless one is legitimately `receiving` (an
        interrupted one may be held for a resume: GetStatus names it while the state says SERVING)."""
        status = self.rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)
        assert (status.weight_version, status.fingerprint) == (1, self.fingerprint)
        phase = pb.ROLLOUT_STATE_RECEIVING if receiving else pb.ROLLOUT_STATE_SERVING
        assert status.state == phase and (bool(status.update_id) or not receiving)
        answer = self.rollout.generate.Generate(PROBE, timeout=30)
        assert (answer.weight_version, list(answer.token_ids)) == (1, self.answer)

    def assert_next_push_works(self, version: int = 2) -> None:
        with Publisher([self.rollout.address], progress=False) as publisher:
            [result] = publisher.push(self.state, version)
        assert result.ok, result.error


@pytest.fixture
def served(rollout: Rollout, trained_state: dict[str, torch.Tensor]) -> Served:
    """A rollout serving version 1 of the trained weights."""
    with Publisher([rollout.address], progress=False) as publisher:
        [result] = publisher.push(trained_state, 1)
    assert result.ok
    answer = list(rollout.generate.Generate(PROBE, timeout=30).token_ids)
    return Served(rollout, trained_state, result.fingerprint, answer)


@pytest.fixture
def other_state(model_dir: Path) -> dict[str, torch.Tensor]:
    return new_model(model_dir, seed=5).state_dict()


def refused(call, code: grpc.StatusCode, reason: Reason | None) -> None:  # type: ignore[no-untyped-def]
    """`call` fails with `code` and the machine-readable `reason` (None: refused by gRPC itself, no reason)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert reason_of(info.value) == reason, info.value.details()


def edit(manifest: Manifest, entries: list) -> Manifest:  # type: ignore[type-arg]
    """Re-lays out `entries` back to back (offsets recomputed) so only the intended fault remains."""
    out, offset = [], 0
    for e in entries:
        out.append(replace(e, offset=offset))
        offset += e.byte_size
    return Manifest(entries=tuple(out))


@pytest.mark.parametrize("version", [0, 1])
def test_stale_or_repeated_version(served: Served, version: int) -> None:
    _, manifest = raw.prepare({k: v + 1 for k, v in served.state.items()})  # another version's bytes
    refused(
        lambda: raw.begin(served.rollout.weight_sync, version, manifest),
        grpc.StatusCode.FAILED_PRECONDITION,
        Reason.STALE_VERSION,
    )
    served.assert_unchanged()


@pytest.mark.parametrize("version", [1 << 53, (1 << 64) - 1], ids=["2**53", "2**64-1"])
def test_versions_from_2_to_the_53_are_refused_by_the_rollout_and_the_publisher(served: Served, version: int) -> None:
    """Not integers every JSON client reads exactly (and 2**64-1 would leave no newer version): refused, saying why."""
    _, manifest = raw.prepare({k: v + 1 for k, v in served.state.items()})
    with pytest.raises(grpc.RpcError) as info:
        raw.begin(served.rollout.weight_sync, version, manifest)
    assert (info.value.code(), reason_of(info.value)) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.BAD_REQUEST)
    assert "below 2**53" in (info.value.details() or "")
    with Publisher([served.rollout.address], progress=False) as publisher:
        with pytest.raises(ValueError, match=r"below 2\*\*53"):
            publisher.push(served.state, version)
    served.assert_unchanged()
    served.assert_next_push_works((1 << 53) - 1)  # the largest version is a version


def test_the_committed_version_again_is_already_committed(served: Served) -> None:
    # the served version as a push announced it, same fingerprint: a retry after a lost answer
    _, manifest = raw.prepare(served.state, piece_bytes=PIECE_BYTES)
    with pytest.raises(grpc.RpcError) as info:
        raw.begin(served.rollout.weight_sync, 1, manifest)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert reason_of(info.value) is Reason.ALREADY_COMMITTED
    assert metadata_of(info.value)["fingerprint"] == manifest.fingerprint
    served.assert_unchanged()


def test_unknown_tensor_name(served: Served) -> None:
    _, manifest = raw.prepare({**served.state, "model.layers.99.mlp.up_proj.weight": torch.zeros(4, 4)})
    refused(
        lambda: raw.begin(served.rollout.weight_sync, 2, manifest),
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.BAD_MANIFEST,
    )
    served.assert_unchanged()


def test_missing_tensor(served: Served) -> None:
    state = {k: v for k, v in served.state.items() if k != "model.layers.2.self_attn.o_proj.weight"}
    _, manifest = raw.prepare(state)
    refused(
        lambda: raw.begin(served.rollout.weight_sync, 2, manifest),
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.BAD_MANIFEST,
    )
    served.assert_unchanged()


def test_wrong_shape(served: Served) -> None:
    _, manifest = raw.prepare(served.state)
    entries = [replace(e, shape=e.shape[::-1]) if e.name.endswith("gate_proj.weight") else e for e in manifest]
    refused(
        lambda: raw.begin(served.rollout.weight_sync, 2, edit(manifest, entries)),
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.BAD_MANIFEST,
    )
    served.assert_unchanged()


def test_wrong_dtype(served: Served) -> None:
    manifest = build_manifest((k, v.to(torch.float16)) for k, v in served.state.items() if k != "lm_head.weight")
    refused(
        lambda: raw.begin(served.rollout.weight_sync, 2, manifest),
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.BAD_MANIFEST,
    )
    served.assert_unchanged()


def test_oversized_update_and_chunks(served: Served) -> None:
    fp32 = build_manifest((k, v.float()) for k, v in served.state.items() if k != "lm_head.weight")
    refused(
        lambda: raw.begin(served.rollout.weight_sync, 2, fp32), grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.TOO_LARGE
    )
    _, manifest = raw.prepare(served.state)
    refused(
        lambda: raw.begin(served.rollout.weight_sync, 2, manifest, chunk_bytes=1 << 30),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.TOO_LARGE,
    )
    # A message over the server's limit never reaches the handler; no stream feeds the update: interrupted.
    update_id = raw.begin(served.rollout.weight_sync, 2, manifest).update_id
    huge = pb.PushChunksRequest(update_id=update_id, index=0, data=bytes(70 << 20)).SerializeToString()
    refused(lambda: raw.push_chunks(served.rollout.channel, [huge]), grpc.StatusCode.RESOURCE_EXHAUSTED, None)
    _wait_no_update(served.rollout)
    served.assert_unchanged()
    served.assert_next_push_works()


def test_forged_fingerprint_or_checksum(served: Served, other_state: dict[str, torch.Tensor]) -> None:
    _, manifest = raw.prepare(served.state)
    stub = served.rollout.weight_sync
    forged = pb.BeginUpdateRequest(
        version=2,
        manifest=raw.wire.manifest_to_proto(manifest),
        chunk_bytes=raw.CHUNK,
        fingerprint="sha256:" + "0" * 64,
    )
    refused(lambda: stub.BeginUpdate(forged, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, Reason.BAD_MANIFEST)
    # The manifest promises one set of tensors; chunks (each self-consistent) carry another.
    other_tensors, _ = raw.prepare(other_state)
    update_id = raw.begin(stub, 2, manifest).update_id
    raw.push_chunks(served.rollout.channel, raw.encoded_chunks(update_id, other_tensors, manifest))
    refused(
        lambda: stub.Commit(pb.CommitRequest(update_id=update_id), timeout=10),
        grpc.StatusCode.FAILED_PRECONDITION,
        Reason.CHECKSUM_MISMATCH,
    )
    served.assert_unchanged()
    served.assert_next_push_works()


def _begin_pending(served: Served, state: dict[str, torch.Tensor]) -> tuple[str, Manifest]:
    """Begins version 2 with checksums_at_commit and streams `state`'s chunks; returns (update id, manifest)."""
    tensors, manifest = raw.prepare(state)
    layout = manifest.with_checksums([""] * len(manifest))
    request = pb.BeginUpdateRequest(
        version=2, manifest=raw.wire.manifest_to_proto(layout), chunk_bytes=raw.CHUNK, checksums_at_commit=True
    )
    update_id = served.rollout.weight_sync.BeginUpdate(request, timeout=10).update_id
    raw.push_chunks(served.rollout.channel, raw.encoded_chunks(update_id, tensors, layout))
    return update_id, manifest


@pytest.mark.parametrize("fault", ["no checksums", "too few", "one wrong", "wrong fingerprint", "other weights"])
def test_checksums_at_commit_that_do_not_match(
    served: Served, other_state: dict[str, torch.Tensor], fault: str
) -> None:
    """Checksums that follow the chunks are held to the bytes that arrived, like ones sent up front."""
    update_id, manifest = _begin_pending(served, other_state if fault == "other weights" else served.state)
    checksums = [e.checksum for e in manifest]
    if fault == "other weights":  # the trainer's checksums and fingerprint, over other bytes than it sent
        _, manifest = raw.prepare(served.state)
        checksums = [e.checksum for e in manifest]
    commit = pb.CommitRequest(update_id=update_id, checksums=checksums, fingerprint=manifest.fingerprint)
    code, reason = grpc.StatusCode.FAILED_PRECONDITION, Reason.CHECKSUM_MISMATCH
    if fault == "no checksums":
        del commit.checksums[:]
        commit.ClearField("fingerprint")
        code, reason = grpc.StatusCode.INVALID_ARGUMENT, Reason.BAD_MANIFEST
    elif fault == "too few":
        del commit.checksums[-1]
        code, reason = grpc.StatusCode.INVALID_ARGUMENT, Reason.BAD_MANIFEST
    elif fault == "one wrong":
        commit.checksums[1] = "xxh3_128:" + "0" * 32
    elif fault == "wrong fingerprint":
        commit.fingerprint = "sha256:" + "0" * 64
        code, reason = grpc.StatusCode.INVALID_ARGUMENT, Reason.BAD_MANIFEST
    refused(lambda: served.rollout.weight_sync.Commit(commit, timeout=10), code, reason)
    served.assert_unchanged()
    served.assert_next_push_works()


def test_checksums_at_commit_must_be_asked_for(served: Served) -> None:
    _, manifest = raw.prepare(served.state)
    layout = raw.wire.manifest_to_proto(manifest.with_checksums([""] * len(manifest)))
    stub = served.rollout.weight_sync
    cases = [
        (pb.BeginUpdateRequest(version=2, manifest=layout, chunk_bytes=raw.CHUNK), Reason.BAD_MANIFEST),
        (
            pb.BeginUpdateRequest(
                version=2,
                manifest=raw.wire.manifest_to_proto(manifest),
                chunk_bytes=raw.CHUNK,
                checksums_at_commit=True,
            ),
            Reason.BAD_MANIFEST,
        ),
        (
            pb.BeginUpdateRequest(
                version=2, manifest=layout, chunk_bytes=raw.CHUNK, checksums_at_commit=True, base_fingerprint="x"
            ),
            Reason.BAD_MANIFEST,
        ),
    ]
    for request, reason in cases:
        refused(lambda r=request: stub.BeginUpdate(r, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, reason)
    # Checksums in a Commit of an update that announced them up front are refused too.
    tensors, _ = raw.prepare(served.state)
    update_id = raw.begin(stub, 2, manifest).update_id
    raw.push_chunks(served.rollout.channel, raw.encoded_chunks(update_id, tensors, manifest))
    commit = pb.CommitRequest(update_id=update_id, checksums=[e.checksum for e in manifest])
    refused(lambda: stub.Commit(commit, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, Reason.BAD_MANIFEST)
    served.assert_unchanged()


def test_tied_alias_that_differs(served: Served) -> None:
    state = {**served.state, "lm_head.weight": served.state["model.embed_tokens.weight"] + 1}
    _, manifest = raw.prepare(state)
    refused(
        lambda: raw.begin(served.rollout.weight_sync, 2, manifest),
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.BAD_MANIFEST,
    )
    with Publisher([served.rollout.address], progress=False) as publisher:  # checksums at commit: refused there
        [result] = publisher.push(state, 2)
    assert not result.ok and result.reason == Reason.BAD_MANIFEST, result.error
    served.assert_unchanged()


def test_corrupted_chunk_aborts_the_update(served: Served) -> None:
    tensors, manifest = raw.prepare(served.state)
    update_id = raw.begin(served.rollout.weight_sync, 2, manifest).update_id
    chunks = raw.encoded_chunks(update_id, tensors, manifest)
    bad = bytearray(chunks[3])
    bad[-100] ^= 0x01
    refused(
        lambda: raw.push_chunks(served.rollout.channel, [*chunks[:3], bytes(bad), *chunks[4:]]),
        grpc.StatusCode.DATA_LOSS,
        Reason.CHUNK_CORRUPT,
    )
    refused(
        lambda: served.rollout.weight_sync.Commit(pb.CommitRequest(update_id=update_id), timeout=10),
        grpc.StatusCode.NOT_FOUND,
        Reason.UNKNOWN_UPDATE,
    )
    served.assert_unchanged()
    served.assert_next_push_works()


@pytest.mark.parametrize("fault", ["out_of_range", "wrong_update"])  # a chunk sent again is ignored: test_resume.py
def test_misplaced_chunks(served: Served, fault: str) -> None:
    tensors, manifest = raw.prepare(served.state)
    update_id = raw.begin(served.rollout.weight_sync, 2, manifest).update_id
    chunks = raw.encoded_chunks(update_id, tensors, manifest)
    stream, code, reason = {
        "out_of_range": (
            [raw.wire.encode_chunk(update_id.encode(), len(chunks), [memoryview(b"x" * 16)])],
            grpc.StatusCode.DATA_LOSS,
            Reason.CHUNK_CORRUPT,
        ),
        "wrong_update": (
            raw.encoded_chunks("someone-else", tensors, manifest)[:1],
            grpc.StatusCode.NOT_FOUND,
            Reason.UNKNOWN_UPDATE,
        ),
    }[fault]
    refused(lambda: raw.push_chunks(served.rollout.channel, stream), code, reason)
    served.rollout.weight_sync.AbortUpdate(pb.AbortUpdateRequest(update_id=update_id), timeout=5) if fault == (
        "wrong_update"
    ) else None
    served.assert_unchanged()
    served.assert_next_push_works()


@pytest.mark.parametrize("sent", [0, 5])
def test_commit_before_every_byte_arrived(served: Served, sent: int) -> None:
    tensors, manifest = raw.prepare(served.state)
    update_id = raw.begin(served.rollout.weight_sync, 2, manifest).update_id
    chunks = raw.encoded_chunks(update_id, tensors, manifest)
    raw.push_chunks(served.rollout.channel, chunks[:sent])  # a truncated stream that ended cleanly
    refused(
        lambda: served.rollout.weight_sync.Commit(pb.CommitRequest(update_id=update_id), timeout=10),
        grpc.StatusCode.FAILED_PRECONDITION,
        Reason.INCOMPLETE_UPDATE,
    )
    served.assert_unchanged()
    served.assert_next_push_works()


def test_second_trainer_is_refused_while_first_pushes(served: Served, other_state: dict[str, torch.Tensor]) -> None:
    tensors, manifest = raw.prepare(other_state)
    stub = served.rollout.weight_sync
    first = raw.begin(stub, 2, manifest).update_id
    refused(lambda: raw.begin(stub, 3, manifest), grpc.StatusCode.ABORTED, Reason.UPDATE_IN_PROGRESS)
    with Publisher([served.rollout.address], progress=False) as second:
        [result] = second.push(served.state, 4)
    assert not result.ok and result.reason == Reason.UPDATE_IN_PROGRESS, result.error
    served.assert_unchanged(receiving=True)
    raw.push_chunks(served.rollout.channel, raw.encoded_chunks(first, tensors, manifest))
    answer = stub.Commit(pb.CommitRequest(update_id=first), timeout=10)
    assert (answer.weight_version, answer.fingerprint) == (2, manifest.fingerprint)


def test_trainer_killed_mid_stream(served: Served, model_dir: Path) -> None:
    script = f"""
import sys, time
import raw
from trainer_side.train import new_model
tensors, manifest = raw.prepare(new_model({str(model_dir)!r}, seed=9).state_dict())
import grpc
channel = grpc.insecure_channel({served.rollout.address!r})
stub = raw.pb_grpc.WeightSyncStub(channel)
update_id = raw.begin(stub, 2, manifest).update_id
chunks = raw.encoded_chunks(update_id, tensors, manifest)
def slow():
    yield from chunks[: len(chunks) // 2]
    print("HALF", flush=True)
    time.sleep(600)
raw.push_chunks(channel, slow())
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "HALF"
        status = served.rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)
        assert status.state == pb.ROLLOUT_STATE_RECEIVING and status.received_bytes > 0
        # Generate still serves version 1 while version 2 is being received.
        answer = served.rollout.generate.Generate(PROBE, timeout=30)
        assert (answer.weight_version, list(answer.token_ids)) == (1, served.answer)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    _wait_no_update(served.rollout)
    served.assert_unchanged()
    served.assert_next_push_works()


def _wait_no_update(rollout: Rollout, timeout: float = 10) -> None:
    """Waits until no update is in progress (an interrupted one may be held for a resume): well before the
    60 s idle timeout, which the rollout runs on here."""
    deadline = time.monotonic() + timeout
    while rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5).state == pb.ROLLOUT_STATE_RECEIVING:
        assert time.monotonic() < deadline, "the rollout kept a dead update in progress"
        time.sleep(0.1)


def test_nonfinite_weights_are_refused_when_asked(loop_thread, model_dir, trained_state) -> None:  # type: ignore[no-untyped-def]
    from conftest import start_rollout

    rollout = start_rollout(loop_thread, model_dir, reject_nonfinite=True)
    try:
        with Publisher([rollout.address], progress=False) as publisher:
            assert publisher.push(trained_state, 1)[0].ok
            poisoned = dict(trained_state)
            poisoned["model.norm.weight"] = trained_state["model.norm.weight"].clone()
            poisoned["model.norm.weight"][3] = float("nan")
            [result] = publisher.push(poisoned, 2)
        assert (result.ok, result.code, result.reason) == (
            False,
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.NON_FINITE_WEIGHTS,
        ), result.error
        status = rollout.weight_sync.GetStatus(pb.GetStatusRequest(), timeout=5)
        assert (status.weight_version, status.state, status.update_id) == (1, pb.ROLLOUT_STATE_SERVING, "")
    finally:
        rollout.channel.close()
        loop_thread.run(rollout.server.stop(grace=0))
