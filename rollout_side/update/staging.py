"""Assembling one version in a staging buffer: where wire bytes land, and the per-tensor verification.

A full update's wire layout is the manifest's layout, so chunks are copied straight into staging.
A delta update (see weightsync/delta.py) interleaves FULL tensors, copied into staging as before, with
PATCH payloads, which are collected aside and applied to the base bytes already in staging once a
tensor's whole patch has arrived. Either way every tensor is checked against its manifest checksum
over its final staged bytes, in layout order, while those bytes are still in cache; so commit only
reads the result, and a patch applied to the wrong base, tampered or malformed is refused there.
Every checksum here is taken over staging itself, never over a message: a chunk is checked where it
landed (Incoming.take_chunk), so the sums hold for the memory an engine goes on to install.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import xxhash

from weightsync.delta import BadPatch, Encoding, TransferPlan, apply_patch
from weightsync.manifest import CHECKSUM_PREFIX, Manifest, StreamingChecksums

__all__ = ["Router", "Verifier"]


@dataclass(frozen=True, slots=True)
class _Segment:
    wire_start: int
    wire_end: int
    target: memoryview
    target_start: int


class Router:
    """Copies a wire range into staging (FULL tensors) or into the patch area (PATCH payloads)."""

    def __init__(self, manifest: Manifest, plan: TransferPlan, staged: memoryview, patches: memoryview) -> None:
        segments: list[_Segment] = []
        patch_offset = 0
        for entry, t in zip(manifest, plan.transfers, strict=True):
            if not t.wire_bytes:
                continue
            if t.encoding == Encoding.FULL:
                last = segments[-1] if segments else None
                if (
                    last
                    and last.target is staged
                    and last.wire_end == t.wire_offset
                    and (last.target_start + last.wire_end - last.wire_start == entry.offset)
                ):
                    segments[-1] = _Segment(last.wire_start, t.wire_end, staged, last.target_start)
                else:
                    segments.append(_Segment(t.wire_offset, t.wire_end, staged, entry.offset))
            else:
                segments.append(_Segment(t.wire_offset, t.wire_end, patches, patch_offset))
                patch_offset += t.wire_bytes
        self._segments = segments
        self._starts = [s.wire_start for s in segments]

    def write(self, start: int, data: memoryview) -> list[memoryview]:
        """Copies wire bytes [start, start + len(data)) into place; returns where they landed, in order."""
        end = start + data.nbytes
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        landed = []
        while start < end:
            s = self._segments[i]
            stop = min(end, s.wire_end)
            at = s.target_start + start - s.wire_start
            target = s.target[at : at + stop - start]
            target[:] = data[: stop - start]
            landed.append(target)
            data = data[stop - start :]
            start = stop
            i += 1
        return landed


class Verifier:
    """Checks each tensor's xxh3_128 incrementally, in layout order, as its final bytes become complete.

    `feed(end)` says that wire bytes [0, end) have arrived. FULL tensors are hashed as their bytes
    arrive (partial tensors included); a PATCH tensor, once its whole patch is in, is patched into the
    base bytes in staging and then hashed. `position` is the wire position verified so far. The first
    tensor that does not match (or whose patch is malformed) is kept in `mismatch`, why in `reason`;
    commit refuses it. A manifest whose checksums are pending is compared at commit, from `checksums`.
    `changed[i]` records the indices a patch replaced (None for FULL tensors), so a receiver can bring
    a copy of the base up to date without copying whole tensors.

    A manifest of the combinable checksum kind (`Manifest.piece_bytes`) is hashed piece by piece; a piece
    that arrived as one whole chunk is taken by the chunk checksum already checked where it landed
    (`chunk_digests`, wire start -> (size, xxh3_64)), so its bytes are not hashed a second time.
    """

    def __init__(
        self,
        manifest: Manifest,
        staged: memoryview,
        plan: TransferPlan | None = None,
        patches: memoryview | None = None,
    ) -> None:
        self.staged = staged
        self.plan = plan or TransferPlan.full(manifest)
        self.patches = patches
        self.position = 0
        self.mismatch: str | None = None  # the name of the first tensor that failed
        self.reason = ""  # why it failed: "does not match its checksum" or a malformed patch
        self.changed: list[np.ndarray | None] = [None] * len(manifest)
        self.checksums = [""] * len(manifest)  # what each tensor's final bytes hash to, once checked
        self._entries = manifest.entries
        self._next = 0  # the first tensor not yet checked
        self._patch_offset = 0
        self._digest = xxhash.xxh3_128()
        self.chunk_digests: dict[int, tuple[int, int]] = {}
        g = manifest.piece_bytes
        self._pieces = StreamingChecksums([e.byte_size for e in manifest], g) if g else None

    def feed(self, end: int) -> None:
        entries, transfers = self._entries, self.plan.transfers
        while self._next < len(entries):
            entry, t = entries[self._next], transfers[self._next]
            if t.encoding == Encoding.FULL:
                stop = min(end, t.wire_end)
                if stop > self.position:
                    at = entry.offset + self.position - t.wire_offset
                    self._hash(self.position, self.staged[at : at + stop - self.position])
                    self.position = stop
                if self.position < t.wire_end:
                    return
            else:
                if end < t.wire_end:
                    return
                self._patch(self._next)
                self.position = t.wire_end
            if self._pieces is not None:
                got = self.checksums[self._next] = self._pieces.checksums[self._next]
            else:
                got = self.checksums[self._next] = CHECKSUM_PREFIX + self._digest.hexdigest()
            if self.mismatch is None and entry.checksum and got != entry.checksum:  # none yet: compared at commit
                self.mismatch, self.reason = entry.name, "does not match its checksum"
            self._digest.reset()
            self._next += 1

    def _patch(self, i: int) -> None:
        """Applies tensor i's patch to the base bytes in staging and hashes the result."""
        entry, t = self._entries[i], self.plan.transfers[i]
        assert self.patches is not None
        payload = self.patches[self._patch_offset : self._patch_offset + t.wire_bytes]
        self._patch_offset += t.wire_bytes
        region = self.staged[entry.offset : entry.end]
        try:
            target = np.frombuffer(region, dtype=f"<i{entry.dtype.itemsize}")
            self.changed[i] = apply_patch(target, payload)
        except BadPatch as error:
            if self.mismatch is None:
                self.mismatch, self.reason = entry.name, f"has a malformed patch ({error})"
            self.changed[i] = None
        if self._pieces is not None:
            self._pieces.update(region)
        else:
            self._digest.update(region)

    def _hash(self, wire_start: int, data: memoryview) -> None:
        """Hashes a FULL tensor's bytes that start at `wire_start`, taking whole chunks by their checksum."""
        sums = self._pieces
        if sums is None:
            self._digest.update(data)
            return
        while data.nbytes:
            known = self.chunk_digests.get(wire_start)
            if known is not None and known[0] <= data.nbytes and sums.wants_piece(known[0]):
                sums.add_digest(*known)
                taken = known[0]
            else:
                taken = min(data.nbytes, self._until_piece_end(wire_start, data.nbytes))
                sums.update(data[:taken])
            data, wire_start = data[taken:], wire_start + taken

    def _until_piece_end(self, wire_start: int, limit: int) -> int:
        """How far to hash bytes from `wire_start` before a known whole-chunk piece may start (at most `limit`)."""
        g = self.piece_bytes
        return min(limit, g - wire_start % g) if g else limit

    @property
    def piece_bytes(self) -> int:
        return self._pieces.piece_bytes if self._pieces is not None else 0
