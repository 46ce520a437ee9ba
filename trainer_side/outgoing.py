"""What one push sends: a version's encoding on the wire, made once for every rollout it goes to.

A full version, or a delta against a base (trainer_side/delta.py makes those). A full version may
start with its checksums pending: the chunks are then checksummed as they are encoded and the
checksums travel in Commit (BeginUpdateRequest.checksums_at_commit), and its tensors may be cast to
bf16 (and copied off the GPU) one at a time as their chunks go out (`Outgoing.streamed`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import overload

import torch

from weightsync import wire
from weightsync.delta import TransferPlan
from weightsync.manifest import Manifest, StreamingChecksums, tensor_bytes, to_wire, wire_layout
from weightsync.v1 import weightsync_pb2 as pb

__all__ = ["Outgoing", "WirePayloads"]


@dataclass(frozen=True)
class Outgoing:
    """One encoding of a version on the wire: the full version, or a delta against `base_fingerprint`.

    A full version may start with its checksums pending (a layout, see `build_layout`): `chunks` then
    hashes each tensor as its bytes go out, the BeginUpdate asks for checksums_at_commit, and the
    Commit carries them. Once computed they are kept, so a second push of it announces them up front.
    """

    version: int
    announced: Manifest  # as first known: checksums may be pending
    payloads: Sequence[memoryview]  # each tensor's wire bytes, in manifest order (maybe made on demand)
    plan: TransferPlan | None = None
    base_fingerprint: str = ""
    _checksums: list[str] = field(default_factory=list)

    @classmethod
    def full(cls, version: int, manifest: Manifest, tensors: Sequence[torch.Tensor]) -> Outgoing:
        return cls(version, manifest, tuple(tensor_bytes(t) for t in tensors))

    @classmethod
    def streamed(cls, version: int, sources: Sequence[tuple[str, torch.Tensor]]) -> Outgoing:
        """A full version of tensors in any float dtype, on any device, cast to bf16 as their chunks go out."""
        return cls(version, wire_layout(sources), WirePayloads([t for _, t in sources]))

    @property
    def sizes(self) -> list[int]:
        """Each payload's size, known without making the payloads."""
        if self.plan is not None:
            return [t.wire_bytes for t in self.plan.transfers]
        return [e.byte_size for e in self.announced]

    @cached_property
    def manifest(self) -> Manifest:
        """The complete manifest; for a pending one, available once `chunks` has run to its end (or
        `adopt_checksums`), and then made once: its fingerprint is asked for by every rollout's result."""
        if not self.announced.pending:
            return self.announced
        if not self._checksums:
            raise RuntimeError("checksums are computed while the chunks stream; stream them first")
        return self.announced.with_checksums(self._checksums)

    @property
    def pending(self) -> bool:
        """Whether the next push must send the checksums at commit (they are not known yet)."""
        return self.announced.pending and not self._checksums

    @property
    def is_delta(self) -> bool:
        return bool(self.base_fingerprint)

    @property
    def wire_bytes(self) -> int:
        return sum(self.sizes)

    def request(self, chunk_bytes: int, update_id: str, **fields: object) -> pb.BeginUpdateRequest:
        delta = {"base_fingerprint": self.base_fingerprint, "plan": wire.plan_to_proto(self.plan)} if self.plan else {}
        pending = self.pending
        manifest = self.announced if pending else self.manifest
        return pb.BeginUpdateRequest(
            version=self.version,
            manifest=wire.manifest_to_proto(manifest),
            chunk_bytes=chunk_bytes,
            fingerprint="" if pending else manifest.fingerprint,
            update_id=update_id,
            checksums_at_commit=pending,
            **delta,  # type: ignore[arg-type]
            **fields,  # type: ignore[arg-type]
        )

    def adopt_checksums(self, checksums: Sequence[str]) -> None:
        """Takes checksums computed elsewhere over these payloads (a shared-memory file, written by the caller)."""
        self.announced.with_checksums(checksums)  # validates the count and form
        self._checksums[:] = checksums

    def commit_request(self, update_id: str, *, pending: bool) -> pb.CommitRequest:
        """The Commit of an update; one begun with checksums pending carries them (and the fingerprint)."""
        if not pending:
            return pb.CommitRequest(update_id=update_id)
        manifest = self.manifest
        return pb.CommitRequest(
            update_id=update_id, checksums=[e.checksum for e in manifest], fingerprint=manifest.fingerprint
        )

    def chunks(self, update_id: str, chunk_bytes: int) -> Iterator[bytes]:
        """Every chunk, encoded once (lazily) for all rollouts that receive this encoding.

        With checksums pending, each tensor is hashed here, a chunk at a time, just before the chunk's
        own checksum and its copy into the message read the same bytes again, from cache.
        """
        key = update_id.encode()
        sizes = self.sizes
        sums = StreamingChecksums(sizes) if self.pending else None
        for index, pieces in wire.iter_wire_payloads(self.payloads, chunk_bytes, sizes):
            if sums is not None:
                for piece in pieces:
                    sums.update(piece)
            yield wire.encode_chunk(key, index, pieces)
        if sums is not None:
            if not sums.done:
                raise RuntimeError("the chunks did not cover every tensor")
            self._checksums[:] = sums.checksums


class WirePayloads(Sequence[memoryview]):
    """Each source tensor's bf16 bytes on the CPU, made when first asked for and kept until another is.

    The chunk encoder and the shared-memory writer walk tensors in order, so a push of fp32 or GPU
    weights holds one cast (or device-to-host) copy at a time beside the window of encoded chunks,
    not a cast copy of the whole model. A bf16 CPU tensor is used as it is, without a copy.
    """

    def __init__(self, sources: Sequence[torch.Tensor]) -> None:
        self._sources = sources
        self._index = -1
        self._view = memoryview(b"")

    def __len__(self) -> int:
        return len(self._sources)

    @overload
    def __getitem__(self, i: int) -> memoryview: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[memoryview]: ...
    def __getitem__(self, i: int | slice) -> memoryview | Sequence[memoryview]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i != self._index:
            self._index, self._view = i, tensor_bytes(to_wire(self._sources[i]))
        return self._view
