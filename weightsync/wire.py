"""The wire format: manifests to and from protobuf, and a zero-copy codec for weight chunks.

`PushChunksRequest` is a plain protobuf message any language can read. Python's generated
classes copy the payload twice on each side and refuse memoryviews, so chunks are encoded and
decoded here by hand, byte-compatible with the generated code (tests check both directions).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import xxhash

from weightsync.adapter import AdapterConfig
from weightsync.delta import Encoding, Transfer, TransferPlan
from weightsync.errors import BadManifest, ChunkCorrupt
from weightsync.manifest import Manifest, TensorEntry
from weightsync.v1 import weightsync_pb2 as pb

__all__ = [
    "Chunk",
    "adapter_from_proto",
    "adapter_to_proto",
    "chunk_checksum",
    "chunk_count",
    "chunk_span",
    "decode_chunk",
    "encode_chunk",
    "encode_file_progress",
    "iter_wire_payloads",
    "manifest_from_proto",
    "manifest_to_proto",
    "pieces_checksum",
    "plan_from_proto",
    "plan_to_proto",
]

_TO_PROTO: dict[torch.dtype, int] = {
    torch.bfloat16: pb.ELEMENT_TYPE_BFLOAT16,
    torch.float16: pb.ELEMENT_TYPE_FLOAT16,
    torch.float32: pb.ELEMENT_TYPE_FLOAT32,
}
_FROM_PROTO: dict[int, torch.dtype] = {v: k for k, v in _TO_PROTO.items()}

# Field tags of PushChunksRequest: (field_number << 3) | wire_type.
_TAG_UPDATE_ID = 0x0A  # 1, length-delimited
_TAG_INDEX = 0x10  # 2, varint
_TAG_CHECKSUM = 0x18  # 3, varint
_TAG_DATA = 0x22  # 4, length-delimited
_TAG_FILE_BYTES = 0x28  # 5, varint


def manifest_to_proto(manifest: Manifest) -> pb.Manifest:
    return pb.Manifest(
        tensors=[
            pb.TensorSpec(
                name=e.name,
                dtype=_TO_PROTO[e.dtype],  # type: ignore[arg-type]
                shape=e.shape,
                offset=e.offset,
                byte_size=e.byte_size,
                checksum=e.checksum,
            )
            for e in manifest
        ],
        total_bytes=manifest.total_bytes,
        checksum_piece_bytes=manifest.piece_bytes,
    )


def manifest_from_proto(message: pb.Manifest) -> Manifest:
    """Validates and converts; raises BadManifest with the first problem found."""
    entries = []
    for spec in message.tensors:
        dtype = _FROM_PROTO.get(spec.dtype)
        if dtype is None:
            raise BadManifest(f"tensor {spec.name!r} has unsupported element type {spec.dtype}")
        entries.append(
            TensorEntry(
                name=spec.name,
                dtype=dtype,
                shape=tuple(spec.shape),
                offset=spec.offset,
                byte_size=spec.byte_size,
                checksum=spec.checksum,
            )
        )
    manifest = Manifest(entries=tuple(entries), piece_bytes=message.checksum_piece_bytes)
    if manifest.total_bytes != message.total_bytes:
        raise BadManifest(f"total_bytes {message.total_bytes} != sum of tensor sizes {manifest.total_bytes}")
    return manifest


def adapter_to_proto(config: AdapterConfig) -> pb.AdapterConfig:
    return pb.AdapterConfig(
        rank=config.rank,
        alpha=config.alpha,
        target_modules=list(config.target_modules),
        use_rslora=config.use_rslora,
        base_fingerprint=config.base_fingerprint,
    )


def adapter_from_proto(message: pb.AdapterConfig) -> AdapterConfig:
    """Validates and converts; BadManifest for a rank, alpha or base the merge cannot use."""
    if message.rank < 1 or not math.isfinite(message.alpha) or not message.base_fingerprint:
        raise BadManifest("an adapter needs rank >= 1, a finite alpha and the base's fingerprint")
    return AdapterConfig(
        rank=message.rank,
        alpha=message.alpha,
        target_modules=tuple(message.target_modules),
        use_rslora=message.use_rslora,
        base_fingerprint=message.base_fingerprint,
    )


def plan_to_proto(plan: TransferPlan) -> pb.TransferPlan:
    return pb.TransferPlan(
        tensors=[
            pb.TensorTransfer(encoding=int(t.encoding), wire_offset=t.wire_offset, wire_bytes=t.wire_bytes)  # type: ignore[arg-type]
            for t in plan.transfers
        ],
        total_bytes=plan.total_bytes,
    )


def plan_from_proto(message: pb.TransferPlan) -> TransferPlan:
    """Validates and converts; raises BadManifest with the first problem found (UNSPECIFIED is FULL)."""
    transfers = []
    for i, spec in enumerate(message.tensors):
        encoding = spec.encoding or pb.TENSOR_ENCODING_FULL
        if encoding not in (pb.TENSOR_ENCODING_FULL, pb.TENSOR_ENCODING_PATCH):
            raise BadManifest(f"transfer {i} has unknown encoding {spec.encoding}")
        transfers.append(Transfer(Encoding(encoding), spec.wire_offset, spec.wire_bytes))
    plan = TransferPlan(tuple(transfers))  # BadPatch if its offsets do not tile
    if plan.total_bytes != message.total_bytes:
        raise BadManifest(f"plan total_bytes {message.total_bytes} != sum of payload sizes {plan.total_bytes}")
    return plan


def chunk_count(total_bytes: int, chunk_bytes: int) -> int:
    return -(-total_bytes // chunk_bytes)


def chunk_span(index: int, total_bytes: int, chunk_bytes: int) -> tuple[int, int]:
    """The [start, end) bytes of chunk `index` in the flat layout."""
    start = index * chunk_bytes
    return start, min(start + chunk_bytes, total_bytes)


def chunk_checksum(data: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(data)


def pieces_checksum(pieces: Sequence[memoryview]) -> int:
    """The chunk checksum of bytes held in pieces (a chunk across tensors, or across a delta's targets)."""
    if len(pieces) == 1:
        return chunk_checksum(pieces[0])
    digest = xxhash.xxh3_64()
    for piece in pieces:
        digest.update(piece)
    return digest.intdigest()


def iter_wire_payloads(
    payloads: Sequence[memoryview], chunk_bytes: int, sizes: Sequence[int] | None = None
) -> Iterator[tuple[int, list[memoryview]]]:
    """Yields (index, pieces) per chunk of the wire layout that `payloads` tile in order (zero-copy).

    A full version's payloads are its tensors' bytes (`tensor_bytes`) in manifest order, a delta's
    are its transfer plan's payloads: both are cut into chunks here, and only here.

    Given their `sizes`, payloads are asked for in order, only as their chunks come: a sequence that
    makes them on demand (casting a tensor to bf16) then needs to hold one at a time.
    """
    sizes = [p.nbytes for p in payloads] if sizes is None else sizes
    total = sum(sizes)
    ends = list(itertools.accumulate(sizes))
    t = 0
    for index in range(chunk_count(total, chunk_bytes)):
        start, end = chunk_span(index, total, chunk_bytes)
        pieces = []
        while start < end:
            while ends[t] <= start:
                t += 1
            offset = ends[t] - sizes[t]
            stop = min(end, ends[t])
            pieces.append(payloads[t][start - offset : stop - offset])
            start = stop
        yield index, pieces


def encode_chunk(update_id: bytes, index: int, pieces: Sequence[memoryview], checksum: int | None = None) -> bytes:
    """Serializes one PushChunksRequest with a single copy of the payload (`checksum`: its xxh3_64, if known)."""
    size = sum(p.nbytes for p in pieces)
    if checksum is None:
        checksum = pieces_checksum(pieces)
    header = _with_update_id(update_id)
    if index:
        header.append(_TAG_INDEX)
        _put_varint(header, index)
    if checksum:
        header.append(_TAG_CHECKSUM)
        _put_varint(header, checksum)
    if size:
        header.append(_TAG_DATA)
        _put_varint(header, size)
    return b"".join([header, *pieces])


def encode_file_progress(update_id: bytes, file_bytes: int) -> bytes:
    """A PushChunksRequest that says the shared-memory file's first `file_bytes` bytes are written."""
    message = _with_update_id(update_id)
    if file_bytes:
        message.append(_TAG_FILE_BYTES)
        _put_varint(message, file_bytes)
    return bytes(message)


def _with_update_id(update_id: bytes) -> bytearray:
    """A PushChunksRequest's encoding up to its update_id (field 1, omitted when empty as proto3 does)."""
    out = bytearray()
    if update_id:
        out.append(_TAG_UPDATE_ID)
        _put_varint(out, len(update_id))
        out += update_id
    return out


@dataclass(frozen=True, slots=True)
class Chunk:
    """A decoded PushChunksRequest; `data` is a view into the received message, not a copy."""

    update_id: str
    index: int
    checksum: int
    data: memoryview
    file_bytes: int = 0  # a shared-memory file's progress (a message with no data)


def decode_chunk(message: bytes) -> Chunk:
    """Parses any valid proto3 encoding of PushChunksRequest (fields in any order, unknown ones
    skipped; deprecated groups are refused)."""
    view = memoryview(message)
    update_id, index, checksum, data, file_bytes = "", 0, 0, view[0:0], 0
    pos, size = 0, len(view)
    while pos < size:
        key, pos = _get_varint(view, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _get_varint(view, pos)
            if field == 2:
                index = value
            elif field == 3:
                checksum = value
            elif field == 5:
                file_bytes = value
        elif wire_type == 2:
            length, pos = _get_varint(view, pos)
            if pos + length > size:
                raise ChunkCorrupt("chunk message is truncated")
            if field == 1:
                update_id = bytes(view[pos : pos + length]).decode("utf-8", "replace")
            elif field == 4:
                data = view[pos : pos + length]
            pos += length
        elif wire_type == 5:
            pos += 4
        elif wire_type == 1:
            pos += 8
        else:
            raise ChunkCorrupt(f"chunk message has invalid wire type {wire_type}")
    if pos != size:
        raise ChunkCorrupt("chunk message is truncated")
    return Chunk(update_id, index, checksum, data, file_bytes)


def _put_varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _get_varint(view: memoryview, pos: int) -> tuple[int, int]:
    """Reads a varint of at most 10 bytes, truncated to 64 bits as protobuf does."""
    result = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise ChunkCorrupt("chunk message has a malformed varint")
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & 0xFFFF_FFFF_FFFF_FFFF, pos
        shift += 7
