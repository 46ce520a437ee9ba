"""The byte plan of a collective push: which rank holds which bytes of the layout, which rank sends each chunk.

Pure: no torch.distributed, no gRPC. Chunks are cut from the full layout as in a plain push; each goes out
from the rank that owns its first byte, and its pieces held by other ranks are exchanged to that rank.
`combine` turns the digests of the pieces every rank hashed into each tensor's combinable checksum.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from weightsync import wire
from weightsync.manifest import Manifest, piece_checksum

__all__ = ["Piece", "Span", "chunk_owners", "combine", "local_view", "spans_of"]


@dataclass(frozen=True, slots=True)
class Span:
    """Bytes [start, end) of the layout, held by `rank` as its local part of tensor `tensor`, from byte `at`
    of that rank's payload of the tensor (not 0 only for the later parts of a delta's patch)."""

    start: int
    end: int
    rank: int
    tensor: int
    at: int = 0


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of a chunk: bytes [start, end) of the full layout, of one tensor, held by one rank."""

    chunk: int
    start: int
    end: int
    span: Span


def spans_of(layout: Manifest, rows: Sequence[Sequence[tuple[int, int, int]]]) -> list[Span]:
    """Every rank's (tensor, first row, row count) as spans of the layout; they must tile it exactly."""
    spans = []
    for rank, held in enumerate(rows):
        for tensor, first, count in held:
            entry = layout.entries[tensor]
            row = entry.byte_size // entry.shape[0] if entry.shape and entry.shape[0] else entry.byte_size
            if count:
                spans.append(Span(entry.offset + first * row, entry.offset + (first + count) * row, rank, tensor))
    spans.sort(key=lambda s: (s.start, s.end))
    position = 0
    for span in spans:
        if span.start != position:
            how = "twice" if span.start < position else "by no rank"
            raise RuntimeError(f"bytes {min(span.start, position)}.. of the layout are held {how}")
        position = span.end
    if position != layout.total_bytes:
        raise RuntimeError(f"bytes {position}..{layout.total_bytes} of the layout are held by no rank")
    return spans


def chunk_owners(spans: Sequence[Span], total: int, chunk_bytes: int) -> list[list[Piece]]:
    """Each chunk's pieces (one per span it meets); the chunk goes out from the rank of its first piece."""
    chunks: list[list[Piece]] = []
    s = 0
    for index in range(wire.chunk_count(total, chunk_bytes)):
        start, end = wire.chunk_span(index, total, chunk_bytes)
        pieces = []
        while start < end:
            while spans[s].end <= start:
                s += 1
            stop = min(end, spans[s].end)
            pieces.append(Piece(index, start, stop, spans[s]))
            start = stop
        chunks.append(pieces)
    return chunks


def local_view(piece: Piece, payloads: Sequence[memoryview]) -> memoryview:
    """The bytes of `piece` from this rank's own part of its tensor."""
    span = piece.span
    return payloads[span.tensor][piece.start - span.start + span.at : piece.end - span.start + span.at]


def combine(layout: Manifest, digests: Sequence[tuple[int, int, int, int]]) -> list[str]:
    """Each tensor's checksum of the combinable kind from the pieces every rank hashed; every byte exactly once."""
    by_tensor: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for start, size, tensor, digest in digests:
        by_tensor[tensor].append((start, size, digest))
    checksums = []
    for i, entry in enumerate(layout):
        pieces = sorted(by_tensor.get(i, []))
        position = entry.offset
        for start, size, _ in pieces:
            if start != position:
                raise RuntimeError(f"tensor {entry.name!r}: its pieces do not cover it once (at byte {position})")
            position += size
        if position != entry.end:
            raise RuntimeError(f"tensor {entry.name!r}: its pieces end at byte {position}, not {entry.end}")
        checksums.append(piece_checksum(layout.piece_bytes, (d for _, _, d in pieces)))
    return checksums
