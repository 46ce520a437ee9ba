"""Resuming an update: which chunks a rollout held when its stream broke, and a reconnection's own chunks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from trainer_side.outgoing import Outgoing, WirePayloads
from weightsync.v1 import weightsync_pb2 as pb

__all__ = ["chunk_size", "held_indices", "held_mask", "own_chunks"]


def held_mask(ranges: Sequence[pb.ChunkRange], count: int) -> bytearray:
    """A byte per chunk, 1 where the rollout holds it (ranges outside the layout are ignored)."""
    mask = bytearray(count)
    for r in ranges:
        start, end = min(r.start, count), min(r.end, count)
        if start < end:
            mask[start:end] = b"\x01" * (end - start)
    return mask


def held_indices(mask: bytearray) -> Iterator[int]:
    """The indices of the chunks `mask` says are held."""
    return (i for i, held in enumerate(mask) if held)


def chunk_size(index: int, total: int, chunk_bytes: int) -> int:
    """The size of chunk `index` of `total` bytes cut into `chunk_bytes` (the last may be shorter)."""
    return min(chunk_bytes, total - index * chunk_bytes)


def own_chunks(outgoing: Outgoing, update_id: str, chunk_bytes: int) -> Iterator[bytes]:
    """`outgoing`'s chunks encoded afresh for one rollout, reading its tensors through views of its own (so
    the push's shared window may read them at the same time), completing its manifest if still pending."""
    payloads = outgoing.payloads
    own = Outgoing(
        outgoing.version,
        outgoing.announced,
        WirePayloads(payloads.sources, payloads.names) if isinstance(payloads, WirePayloads) else payloads,
        plan=outgoing.plan,
        base_fingerprint=outgoing.base_fingerprint,
    )
    yield from own.chunks(update_id, chunk_bytes)
    if outgoing.manifest is None and own.manifest is not None:
        outgoing.manifest = own.manifest
