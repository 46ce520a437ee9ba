"""A hand-driven WeightSync client for tests that need to misbehave on purpose."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grpc
import torch

from weightsync import wire
from weightsync.channel import raw_push_chunks
from weightsync.manifest import Manifest, build_manifest, tensor_bytes, wire_tensors
from weightsync.v1 import weightsync_pb2 as pb
from weightsync.v1 import weightsync_pb2_grpc as pb_grpc

CHUNK = 256 << 10


def prepare(state: Mapping[str, torch.Tensor], piece_bytes: int = 0) -> tuple[list[torch.Tensor], Manifest]:
    """The wire tensors and their manifest: plain xxh3_128 unless `piece_bytes` names the combinable kind."""
    named = dict(wire_tensors(state))
    return list(named.values()), build_manifest(named.items(), piece_bytes=piece_bytes)


def begin(
    stub: pb_grpc.WeightSyncStub,
    version: int,
    manifest: Manifest,
    *,
    chunk_bytes: int = CHUNK,
    update_id: str = "",
    pending: bool = False,
) -> pb.BeginUpdateResponse:
    """BeginUpdate; `pending` announces the layout with checksums at commit, as a Publisher without delta does."""
    announced = manifest.with_piece_bytes(manifest.piece_bytes) if pending else manifest
    return stub.BeginUpdate(
        pb.BeginUpdateRequest(
            version=version,
            manifest=wire.manifest_to_proto(announced),
            chunk_bytes=chunk_bytes,
            fingerprint="" if pending else manifest.fingerprint,
            update_id=update_id,
            checksums_at_commit=pending,
        ),
        timeout=30,
    )


def encoded_chunks(
    update_id: str, tensors: list[torch.Tensor], manifest: Manifest, chunk_bytes: int = CHUNK
) -> list[bytes]:
    return [
        wire.encode_chunk(update_id.encode(), index, pieces)
        for index, pieces in wire.iter_wire_payloads([tensor_bytes(t) for t in tensors], chunk_bytes)
    ]


def push_chunks(channel: grpc.Channel, messages: Iterable[bytes]) -> pb.PushChunksResponse:
    return raw_push_chunks(channel)(iter(messages), timeout=60)


def full_push(channel: grpc.Channel, stub: pb_grpc.WeightSyncStub, state: Mapping[str, torch.Tensor], version: int):  # type: ignore[no-untyped-def]
    """Begin, stream and commit by hand; returns the CommitResponse."""
    tensors, manifest = prepare(state)
    update_id = begin(stub, version, manifest).update_id
    push_chunks(channel, encoded_chunks(update_id, tensors, manifest))
    return stub.Commit(pb.CommitRequest(update_id=update_id), timeout=30)
