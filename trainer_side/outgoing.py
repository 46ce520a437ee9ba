"""What one push sends: a version's encoding on the wire, made once for every rollout it goes to.

A full version, or a delta against a base (trainer_side/base_store.py makes those). A full version may
start with its checksums pending: the chunks are then checksummed as they are encoded and the
checksums travel in Commit (BeginUpdateRequest.checksums_at_commit), and its tensors may be cast to
bf16 (and copied off the GPU) one at a time as their chunks go out (`Outgoing.streamed`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import overload

import torch

from weightsync import wire
from weightsync.adapter import AdapterConfig
from weightsync.delta import TransferPlan
from weightsync.manifest import Manifest, StreamingChecksums, tensor_bytes, to_wire, wire_layout, wire_sources
from weightsync.v1 import weightsync_pb2 as pb

__all__ = ["EncodeError", "Outgoing", "Payloads", "WirePayloads", "wire_copies"]


class EncodeError(RuntimeError):
    """A tensor could not be made into its wire bytes (a CUDA out-of-memory copying it, say): the update
    fails on every rollout it was going to, and the failed results name the tensor and the cause."""

    def __init__(self, name: str, cause: BaseException) -> None:
        super().__init__(f"tensor {name!r} could not be encoded: {type(cause).__name__}: {cause}")
        self.name = name


class Outgoing:
    """One encoding of a version on the wire: the full version, or a delta against `base_fingerprint`.

    Its manifest is complete from the start when the checksums are known (a delta, a version a diff
    hashed). Otherwise it goes in two phases: `announced` is a layout with the checksums pending, and
    `manifest` is None until the bytes have gone out once, through `chunks` (which hashes each tensor
    as its bytes go out) or a writer that hashed them and hands the checksums to `complete`. From then
    on `manifest` is the complete manifest, and a second push of this encoding announces it up front.
    """

    __slots__ = ("adapter", "announced", "base_fingerprint", "manifest", "payloads", "plan", "version")

    def __init__(
        self,
        version: int,
        announced: Manifest,
        payloads: Sequence[memoryview],
        *,
        plan: TransferPlan | None = None,
        base_fingerprint: str = "",
        adapter: AdapterConfig | None = None,
    ) -> None:
        self.version = version
        self.announced = announced  # as first known: its checksums may be pending
        self.payloads = payloads  # each tensor's wire bytes, in manifest order (maybe made on demand)
        self.plan = plan  # a delta's: which tensors go as patches, and their sizes on the wire
        self.base_fingerprint = base_fingerprint  # a delta's: the version it patches
        self.adapter = adapter  # set: the tensors are a LoRA adapter of the base it names
        self.manifest: Manifest | None = None if announced.pending else announced  # complete, once known

    @classmethod
    def full(
        cls, version: int, manifest: Manifest, tensors: Sequence[torch.Tensor], adapter: AdapterConfig | None = None
    ) -> Outgoing:
        return cls(version, manifest, tuple(tensor_bytes(t) for t in tensors), adapter=adapter)

    @classmethod
    def streamed(cls, version: int, sources: Sequence[tuple[str, torch.Tensor]], piece_bytes: int = 0) -> Outgoing:
        """A full version of tensors in any float dtype, on any device, cast to bf16 as their chunks go out.

        `piece_bytes` announces checksums of the combinable kind (weightsync/manifest.py), which reuse the
        chunks' own hashes when it equals the chunk size: for rollouts that take it."""
        layout = wire_layout(sources).with_piece_bytes(piece_bytes)
        return cls(version, layout, WirePayloads([t for _, t in sources], [n for n, _ in sources]))

    @property
    def sizes(self) -> list[int]:
        """Each payload's size, known without making the payloads."""
        if self.plan is not None:
            return [t.wire_bytes for t in self.plan.transfers]
        return [e.byte_size for e in self.announced]

    @property
    def pending(self) -> bool:
        """Whether the checksums are not known yet: the next push computes them and sends them at commit."""
        return self.manifest is None

    @property
    def is_delta(self) -> bool:
        return bool(self.base_fingerprint)

    @property
    def wire_bytes(self) -> int:
        return sum(self.sizes)

    def complete(self, checksums: Sequence[str]) -> Manifest:
        """Ends the pending phase with each tensor's checksum, computed over these payloads; returns the
        complete manifest (validated: one well-formed checksum per tensor)."""
        self.manifest = self.announced.with_checksums(checksums)
        return self.manifest

    def request(self, chunk_bytes: int, update_id: str, **fields: object) -> pb.BeginUpdateRequest:
        delta = {"base_fingerprint": self.base_fingerprint, "plan": wire.plan_to_proto(self.plan)} if self.plan else {}
        if self.adapter is not None:
            delta["adapter"] = wire.adapter_to_proto(self.adapter)
        manifest = self.manifest
        return pb.BeginUpdateRequest(
            version=self.version,
            manifest=wire.manifest_to_proto(manifest or self.announced),
            chunk_bytes=chunk_bytes,
            fingerprint=manifest.fingerprint if manifest is not None else "",
            update_id=update_id,
            checksums_at_commit=manifest is None,
            **delta,  # type: ignore[arg-type]
            **fields,  # type: ignore[arg-type]
        )

    def chunks(self, update_id: str, chunk_bytes: int) -> Iterator[bytes]:
        """Every chunk, encoded once (lazily) for all rollouts that receive this encoding.

        With checksums pending, each tensor is hashed here, a chunk at a time, just before the chunk's
        own checksum and its copy into the message read the same bytes again, from cache; the last chunk
        completes the manifest.
        """
        key = update_id.encode()
        sizes = self.sizes
        g = self.announced.piece_bytes
        sums = StreamingChecksums(sizes, g) if self.pending else None
        for index, pieces in wire.iter_wire_payloads(self.payloads, chunk_bytes, sizes):
            if sums is not None and g == chunk_bytes and len(pieces) == 1:
                digest = wire.chunk_checksum(pieces[0])  # the chunk is one piece: one hash serves both
                sums.add_digest(pieces[0].nbytes, digest)
                yield wire.encode_chunk(key, index, pieces, digest)
                continue
            if sums is not None:
                for piece in pieces:
                    sums.update(piece)
            yield wire.encode_chunk(key, index, pieces)
        if sums is not None:
            if not sums.done:
                raise RuntimeError("the chunks did not cover every tensor")
            self.complete(sums.checksums)


def wire_copies(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each float tensor of `state` as it travels (`wire_tensors`); EncodeError names one that cannot be made."""
    copies = {}
    for name, tensor in wire_sources(state):
        try:
            copies[name] = to_wire(tensor)
        except Exception as error:  # any failure to make the bytes fails the push, naming the tensor
            raise EncodeError(name, error) from error
    return copies


def commit_request(update_id: str, manifest: Manifest, *, pending: bool) -> pb.CommitRequest:
    """The Commit of an update; one begun with checksums pending carries them (and the fingerprint)."""
    if not pending:
        return pb.CommitRequest(update_id=update_id)
    return pb.CommitRequest(
        update_id=update_id, checksums=[e.checksum for e in manifest], fingerprint=manifest.fingerprint
    )


class Payloads(Sequence[memoryview]):
    """Each tensor's wire bytes by index, made on demand (`payload`); slices give lists of them."""

    @abstractmethod
    def payload(self, i: int) -> memoryview: ...

    @overload
    def __getitem__(self, i: int) -> memoryview: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[memoryview]: ...
    def __getitem__(self, i: int | slice) -> memoryview | Sequence[memoryview]:
        if isinstance(i, slice):
            return [self.payload(j) for j in range(*i.indices(len(self)))]
        return self.payload(i)


class WirePayloads(Payloads):
    """Each source tensor's bf16 bytes on the CPU, made when first asked for and kept until another is.

    The chunk encoder and the shared-memory writer walk tensors in order, so a push of fp32 or GPU
    weights holds one cast (or device-to-host) copy at a time beside the window of encoded chunks,
    not a cast copy of the whole model. A bf16 CPU tensor is used as it is, without a copy. A tensor whose
    cast or copy fails raises EncodeError, named by `names` (its index if none are given).
    """

    def __init__(self, sources: Sequence[torch.Tensor], names: Sequence[str] = ()) -> None:
        self._sources = sources
        self.names = names
        self._index = -1
        self._view = memoryview(b"")

    @property
    def sources(self) -> Sequence[torch.Tensor]:
        """The tensors, as given: a second reader (a rollout's resumed push) makes its own WirePayloads of them."""
        return self._sources

    def __len__(self) -> int:
        return len(self._sources)

    def payload(self, i: int) -> memoryview:
        if i != self._index:
            try:
                view = tensor_bytes(to_wire(self._sources[i]))
            except Exception as error:  # any failure to make the bytes fails the update, naming the tensor
                raise EncodeError(self.names[i] if i < len(self.names) else f"#{i}", error) from error
            self._index, self._view = i, view
        return self._view
