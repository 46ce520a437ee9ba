"""A collective push's bytes between ranks: the pieces of chunks other ranks hold, exchanged over gloo a
bucket of chunks at a time, and the chunks each rank sends, encoded (and hashed as pieces) as they go out.

Every rank walks the same buckets, so the point-to-point sends and receives pair up, and a rank holds at
most a bucket's worth of other ranks' bytes (trainer_side/sharded/plan.py says which rank holds what).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
import xxhash

from trainer_side.sharded.plan import Piece, local_view
from weightsync import wire
from weightsync.manifest import tensor_bytes

__all__ = ["Digest", "PieceMover"]

Digest = tuple[int, int, int, int]  # (flat start, size, tensor, xxh3_64) of a piece a rank hashed
_HASH_TAGS = 1 << 20  # gloo tags of a delta's hashing pass, apart from its sending pass's


class PieceMover:
    """One rank's side of moving pieces: its gloo group and deadline."""

    def __init__(self, group: dist.ProcessGroup, rank: int, timeout: float) -> None:
        self.group = group
        self.rank = rank
        self.timeout = timeout

    def exchange(
        self, chunks: Sequence[Sequence[Piece]], payloads: Sequence[memoryview], tag: int
    ) -> dict[int, memoryview]:
        """Sends the pieces this rank holds of `chunks` that another rank sends, and receives the pieces of
        its own `chunks` that other ranks hold; returns the received pieces by their start in the layout."""
        outgoing: dict[int, list[Piece]] = defaultdict(list)
        incoming: dict[int, list[Piece]] = defaultdict(list)
        for pieces in chunks:
            owner = pieces[0].span.rank
            for piece in pieces:
                if piece.span.rank == self.rank and owner != self.rank:
                    outgoing[owner].append(piece)
                elif owner == self.rank and piece.span.rank != self.rank:
                    incoming[piece.span.rank].append(piece)
        if not outgoing and not incoming:
            return {}
        works = []
        buffers: dict[int, tuple[torch.Tensor, list[Piece]]] = {}
        for peer, pieces in sorted(incoming.items()):
            buffer = torch.empty(sum(p.end - p.start for p in pieces), dtype=torch.uint8)
            buffers[peer] = (buffer, pieces)
            works.append(dist.irecv(buffer, src=peer, group=self.group, tag=tag))
        sends = []  # kept alive until the sends complete
        for peer, pieces in sorted(outgoing.items()):
            data = torch.empty(sum(p.end - p.start for p in pieces), dtype=torch.uint8)
            view, at = tensor_bytes(data), 0
            for piece in pieces:
                size = piece.end - piece.start
                view[at : at + size] = local_view(piece, payloads)
                at += size
            sends.append(data)
            works.append(dist.isend(data, dst=peer, group=self.group, tag=tag))
        for work in works:
            assert work is not None
            work.wait(timedelta(seconds=self.timeout))
        received: dict[int, memoryview] = {}
        for buffer, pieces in buffers.values():
            view, at = tensor_bytes(buffer), 0
            for piece in pieces:
                received[piece.start] = view[at : at + piece.end - piece.start]
                at += piece.end - piece.start
        return received

    def chunks(
        self,
        key: bytes,
        chunks: Sequence[Sequence[Piece]],
        payloads: Sequence[memoryview],
        digests: list[Digest],
        bucket: int,
        *,
        hashing: bool = True,
    ) -> Iterator[bytes]:
        """Encodes the chunks this rank sends, noting each piece's digest for the checksums rank 0 combines.

        Goes `bucket` chunks at a time: the pieces of them other ranks hold are exchanged first (every rank
        walks the same buckets), so a rank holds at most a bucket's worth of other ranks' bytes."""
        for first in range(0, len(chunks), bucket):
            received = self.exchange(chunks[first : first + bucket], payloads, tag=first // bucket)
            for index in range(first, min(first + bucket, len(chunks))):
                pieces = chunks[index]
                if pieces[0].span.rank == self.rank:
                    views, checksum = self.views(pieces, payloads, received, digests if hashing else None)
                    yield wire.encode_chunk(key, index, views, checksum)

    def digests(self, chunks: Sequence[Sequence[Piece]], payloads: Sequence[memoryview], bucket: int) -> list[Digest]:
        """Hashes the pieces of the chunks this rank would send, without sending them (a delta's checksums)."""
        digests: list[Digest] = []
        for first in range(0, len(chunks), bucket):
            received = self.exchange(chunks[first : first + bucket], payloads, tag=_HASH_TAGS + first // bucket)
            for pieces in chunks[first : first + bucket]:
                if pieces[0].span.rank == self.rank:
                    self.views(pieces, payloads, received, digests)
        return digests

    def views(
        self,
        pieces: Sequence[Piece],
        payloads: Sequence[memoryview],
        received: Mapping[int, memoryview],
        digests: list[Digest] | None,
    ) -> tuple[list[memoryview], int | None]:
        """A chunk's bytes, and its checksum when hashing it as pieces (`digests`) gave it on the way."""
        views = [local_view(p, payloads) if p.span.rank == self.rank else received[p.start] for p in pieces]
        if digests is None:
            return views, None
        # A chunk is one piece of the combinable checksum per tensor it meets (the piece size is the
        # chunk size): a chunk inside one tensor is hashed once, for both.
        by_tensor: dict[int, list[memoryview]] = defaultdict(list)
        starts: dict[int, int] = {}
        for piece, view in zip(pieces, views, strict=True):
            by_tensor[piece.span.tensor].append(view)
            starts.setdefault(piece.span.tensor, piece.start)
        checksum = None
        for tensor, parts in by_tensor.items():
            digest = wire.chunk_checksum(parts[0]) if len(parts) == 1 else _xxh3_64(parts)
            digests.append((starts[tensor], sum(v.nbytes for v in parts), tensor, digest))
            if len(by_tensor) == 1:
                checksum = digest
        return views, checksum


def _xxh3_64(parts: Sequence[memoryview]) -> int:
    digest = xxhash.xxh3_64()
    for part in parts:
        digest.update(part)
    return int(digest.intdigest())
