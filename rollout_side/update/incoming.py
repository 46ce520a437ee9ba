"""One update on its way in: where its bytes land, how many have arrived, and whether they are the version announced.

The receiver (rollout_side/update/receiver.py) decides what may happen to an update and when; an `Incoming`
keeps its bytes' books: chunk checks and placement, shared-memory file progress, and the verification
at commit. The rollout's mirror of the trainer's outgoing update.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from rollout_side.engines.base import ParamSpec
from rollout_side.update.compat import check_manifest
from rollout_side.update.staging import Router, Verifier
from rollout_side.update.version_file import VersionFileReader
from weightsync.adapter import AdapterConfig
from weightsync.delta import TransferPlan
from weightsync.errors import BadManifest, ChecksumMismatch, ChunkCorrupt, IncompleteUpdate, NonFiniteWeights, Reason
from weightsync.manifest import Manifest
from weightsync.wire import chunk_checksum, chunk_span, pieces_checksum

__all__ = ["Incoming", "check_announcement", "check_finite"]


@dataclass(kw_only=True, slots=True)
class Incoming:
    """One update in progress: where its bytes go and how many have arrived."""

    id: str
    version: int
    manifest: Manifest
    chunk_bytes: int
    staging: torch.Tensor
    received: bytearray
    plan: TransferPlan
    router: Router
    verifier: Verifier
    base_fingerprint: str = ""  # a delta's base: the committed version when it began
    adapter: AdapterConfig | None = None  # set: the bytes are a LoRA adapter to merge into this base
    file: VersionFileReader | None = None  # where the bytes come from instead of chunks (shared memory)
    received_chunks: int = 0
    received_bytes: int = 0
    contiguous: int = 0  # the first chunk not yet received: every wire byte before it has arrived
    last_activity: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)
    peer: str = ""  # who began (or last resumed) it, as gRPC names the caller
    streams: int = 0  # PushChunks streams feeding it now
    quiet_since: float = field(default_factory=time.monotonic)  # since when no stream has fed it
    interrupted: str = ""  # why its streams stopped without Commit, while it waits for a resume
    flip_landed: bool = False  # tests only (failpoint corrupt-landed): each chunk lands with a byte flipped

    def resumes(
        self,
        version: int,
        manifest: Manifest,
        chunk_bytes: int,
        plan: TransferPlan,
        base_fingerprint: str,
        adapter: AdapterConfig | None = None,
    ) -> bool:
        """Whether an announcement is this update again: same version and layout, so the chunks held still fit.

        A pending manifest compares by layout only; the bytes held are checked against the checksums at
        commit like any others, so a different version of the same layout is refused there, not here.
        """
        return (
            self.file is None
            and (version, chunk_bytes, base_fingerprint) == (self.version, self.chunk_bytes, self.base_fingerprint)
            and plan == self.plan
            and manifest == self.manifest
            and adapter == self.adapter
        )

    def held_chunks(self) -> list[tuple[int, int]]:
        """The chunks that arrived, verified, as [start, end) index ranges."""
        ranges: list[tuple[int, int]] = []
        end = 0
        while (start := self.received.find(1, end)) >= 0:
            end = self.received.find(0, start)
            end = self.chunk_count if end < 0 else end
            ranges.append((start, end))
        return ranges

    @property
    def chunk_count(self) -> int:
        return len(self.received)

    @property
    def wire_bytes(self) -> int:
        """Bytes the chunks carry: the manifest's total for a full update, less for a delta."""
        return self.plan.total_bytes

    def take_chunk(self, index: int, checksum: int, data: memoryview) -> int:
        """Lands chunk `index` and checks it where it landed; returns its bytes (0: it arrived before).

        The checksum is taken over the staged copy, not the message: that one pass verifies both the wire
        and the copy, and it is over the memory the engine installs (the torch engine serves staging itself,
        so it need not hash it again). A chunk that fails leaves unverified bytes where no verified chunk
        lies; the receiver then aborts the update, and its staging's bytes count as unknown.
        A chunk that arrived before is checked but not written: a resumed trainer or a relay may send it
        again, and the bytes that came first stay (commit checks them like any others).
        """
        if self.file is not None:
            raise ChunkCorrupt("this update's bytes come from its shared-memory file, not in chunks")
        if index >= self.chunk_count:
            raise ChunkCorrupt(f"chunk {index} is outside the layout ({self.chunk_count} chunks)")
        start, end = chunk_span(index, self.wire_bytes, self.chunk_bytes)
        if data.nbytes != end - start:
            raise ChunkCorrupt(f"chunk {index} has {data.nbytes} bytes, expected {end - start}")
        if self.received[index]:
            if chunk_checksum(data) != checksum:
                raise ChunkCorrupt(f"chunk {index} failed its checksum")
            return 0
        landed = self.router.write(start, data)
        if self.flip_landed:
            landed[0][0] ^= 1
        if pieces_checksum(landed) != checksum:
            raise ChunkCorrupt(f"chunk {index} failed its checksum")
        if self.verifier.piece_bytes:  # the combinable checksum kind reuses it instead of hashing again
            self.verifier.chunk_digests[start] = (data.nbytes, checksum)
        self.received[index] = 1
        self.received_chunks += 1
        self.received_bytes += data.nbytes
        self.last_activity = time.monotonic()
        # Checksum tensors while their bytes are still in cache: commit then only reads the result. Only bytes
        # with no gap before them count (an earlier chunk may still be missing), and a patch only once all of it
        # has arrived, so the verifier may stop short of this chunk's end until a later chunk lands.
        while self.contiguous < self.chunk_count and self.received[self.contiguous]:
            self.contiguous += 1
        ready = min(self.contiguous * self.chunk_bytes, self.wire_bytes)
        if ready > self.verifier.position:
            self.verifier.feed(ready)
        return data.nbytes

    def file_read(self, end: int) -> None:
        """Wire bytes [0, end) came from the file: checksum them; at the end, every chunk counts as in."""
        self.verifier.feed(end)
        self.received_bytes = end
        self.last_activity = time.monotonic()
        if end == self.wire_bytes:
            self.received[:] = b"\x01" * self.chunk_count
            self.received_chunks = self.contiguous = self.chunk_count

    def close_file(self) -> None:
        if self.file is not None:
            self.file.close()

    def verify(self, checksums: Sequence[str], fingerprint: str, specs: Mapping[str, ParamSpec]) -> None:
        """Refuses a staged version that is incomplete or not the one announced; completes a pending manifest.

        `checksums` and `fingerprint` come with Commit for an update begun with checksums_at_commit.
        """
        if self.file is not None and self.file.position < self.wire_bytes:
            raise IncompleteUpdate(
                f"the shared-memory file was announced up to byte {self.file.position} of {self.wire_bytes}"
            )
        missing = self.chunk_count - self.received_chunks
        if missing:
            raise IncompleteUpdate(f"{missing} of {self.chunk_count} chunks have not arrived")
        self.verifier.feed(self.wire_bytes)  # a no-op unless chunks came out of order
        if self.verifier.mismatch is not None:
            message = f"tensor {self.verifier.mismatch!r} {self.verifier.reason}"
            if self.base_fingerprint:
                raise ChecksumMismatch(f"{message}; send a full version", reason=Reason.FULL_VERSION_NEEDED)
            raise ChecksumMismatch(message)
        if not self.manifest.pending:
            if checksums or fingerprint:
                raise BadManifest("checksums come with Commit only for an update begun with checksums_at_commit")
            return
        if not fingerprint:
            raise BadManifest("this update was begun with checksums_at_commit: Commit must carry the fingerprint")
        manifest = self.manifest.with_checksums(checksums)
        for entry, got in zip(manifest, self.verifier.checksums, strict=True):
            if got != entry.checksum:
                raise ChecksumMismatch(f"tensor {entry.name!r} does not match its checksum")
        if fingerprint != manifest.fingerprint:
            raise BadManifest("the fingerprint in Commit does not match the checksums it completes")
        check_manifest(specs, manifest)  # tied tensors must be equal, which only checksums show
        self.manifest = manifest


def check_announcement(
    manifest: Manifest, at_commit: bool, fingerprint: str, base_fingerprint: str, plan: TransferPlan | None
) -> None:
    """A manifest comes with its checksums, or (checksums_at_commit, full versions only) without any."""
    if not at_commit:
        if manifest.pending:
            raise BadManifest("the manifest has no checksums; set checksums_at_commit to send them with Commit")
        return
    if not manifest.pending:
        raise BadManifest("checksums_at_commit: the manifest must leave every checksum empty")
    if fingerprint:
        raise BadManifest("checksums_at_commit: the fingerprint comes with Commit, not BeginUpdate")
    if base_fingerprint or plan is not None:
        raise BadManifest("checksums_at_commit is for full versions, not deltas")


def check_finite(manifest: Manifest, staging: torch.Tensor) -> None:
    """Refuses a version holding NaN or infinity: almost always a diverged trainer, never wanted."""
    for name, view in manifest.views(staging):
        if not bool(torch.isfinite(view).all()):
            raise NonFiniteWeights(f"tensor {name!r} holds NaN or infinite values; refused (--reject-nonfinite)")
