"""Manifests of a version: tensor layout, checksums and the fingerprint both sides compute."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import torch
import xxhash

from weightsync.errors import BadManifest

__all__ = [
    "DTYPE_NAMES",
    "PIECE_BYTES",
    "Manifest",
    "StreamingChecksums",
    "TensorEntry",
    "build_layout",
    "build_manifest",
    "entry_checksum",
    "manifest_of_state",
    "piece_checksum",
    "piece_prefix",
    "tensor_bytes",
    "tensor_checksum",
    "to_wire",
    "wire_layout",
    "wire_sources",
    "wire_tensors",
]

# Element types allowed on the wire, by their short names (as in safetensors).
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
}
CHECKSUM_PREFIX = "xxh3_128:"
_CHECKSUM = re.compile(re.escape(CHECKSUM_PREFIX) + "[0-9a-f]{32}")
# The combinable kind (Manifest.piece_bytes = G > 0): "xxh3_128/G:" and the xxh3_128 of the tensor's piece
# digests, where the pieces are the tensor's bytes cut at every multiple of G in the flat layout, and each
# piece's digest is its xxh3_64 as 8 little-endian bytes. With chunks of G bytes, a chunk inside one tensor is
# one piece: its chunk checksum is that piece's digest, so each byte is hashed once per side; and ranks that
# each hold part of a tensor hash their own pieces, combined by whoever commits.
# What a publisher announces by default (piece_checksums=None), and what `manifest_of_state` computes: the
# default chunk size, so a default push hashes each byte once per side and its fingerprint does not depend
# on the chunk size the caller picked.
PIECE_BYTES = 1 << 20


def piece_prefix(piece_bytes: int) -> str:
    return f"xxh3_128/{piece_bytes}:" if piece_bytes else CHECKSUM_PREFIX


def piece_checksum(piece_bytes: int, digests: Iterable[int]) -> str:
    """A tensor's checksum of the combinable kind, from its pieces' xxh3_64 digests in order."""
    packed = b"".join(d.to_bytes(8, "little") for d in digests)
    return piece_prefix(piece_bytes) + xxhash.xxh3_128_hexdigest(packed)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Returns a zero-copy byte view of a contiguous CPU tensor."""
    flat = tensor.detach().reshape(-1).view(torch.uint8)
    return flat.numpy().data.cast("B")


def tensor_checksum(data: bytes | memoryview) -> str:
    """xxh3_128 of a tensor's bytes: fast enough (~30 GB/s) to never bound a sync."""
    return CHECKSUM_PREFIX + xxhash.xxh3_128_hexdigest(data)


def entry_checksum(data: memoryview, offset: int, piece_bytes: int = 0) -> str:
    """The checksum of one tensor's bytes `data` lying at `offset` of a layout, of the kind `piece_bytes` names."""
    if not piece_bytes:
        return tensor_checksum(data)
    digests = []
    position, end = offset, offset + data.nbytes
    while position < end:
        stop = min(end, (position // piece_bytes + 1) * piece_bytes)
        digests.append(xxhash.xxh3_64_intdigest(data[position - offset : stop - offset]))
        position = stop
    return piece_checksum(piece_bytes, digests)


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorEntry:
    """One tensor of a version and where it lives in the flat byte layout."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    byte_size: int
    checksum: str

    @property
    def end(self) -> int:
        return self.offset + self.byte_size


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Every tensor of a version, tiling [0, total_bytes) in order.

    `piece_bytes` 0: each checksum is xxh3_128 of the tensor's bytes; G > 0: the combinable kind (see
    `piece_checksum`), which a sharded trainer sends since no rank holds a whole sharded tensor.
    """

    entries: tuple[TensorEntry, ...]
    piece_bytes: int = 0

    def __post_init__(self) -> None:
        if self.piece_bytes < 0:
            raise BadManifest(f"piece_bytes must not be negative, got {self.piece_bytes}")
        pattern = (
            re.compile(re.escape(piece_prefix(self.piece_bytes)) + "[0-9a-f]{32}") if self.piece_bytes else _CHECKSUM
        )
        position = 0
        seen: set[str] = set()
        for entry in self.entries:
            if entry.name in seen:
                raise BadManifest(f"tensor {entry.name!r} appears twice in the manifest")
            seen.add(entry.name)
            if entry.dtype not in DTYPE_NAMES:
                raise BadManifest(f"tensor {entry.name!r} has unsupported dtype {entry.dtype}")
            if any(d < 0 for d in entry.shape):
                raise BadManifest(f"tensor {entry.name!r} has a negative dimension")
            expected = _numel(entry.shape) * entry.dtype.itemsize
            if entry.byte_size != expected:
                raise BadManifest(
                    f"tensor {entry.name!r}: byte_size {entry.byte_size} != {expected} for "
                    f"shape {list(entry.shape)} {DTYPE_NAMES[entry.dtype]}"
                )
            if entry.offset != position:
                raise BadManifest(
                    f"tensor {entry.name!r} starts at byte {entry.offset}, expected {position}: "
                    "tensors must tile the layout without gaps or overlaps"
                )
            if not pattern.fullmatch(entry.checksum) and not (self.pending and not entry.checksum):
                prefix = piece_prefix(self.piece_bytes)
                raise BadManifest(f"tensor {entry.name!r} checksum must be {prefix!r} and 32 hex digits")
            position = entry.end

    @cached_property
    def pending(self) -> bool:
        """True when no tensor has its checksum yet: the layout of a version whose checksums follow later
        (computed while its chunks stream; see `with_checksums`)."""
        return bool(self.entries) and not any(e.checksum for e in self.entries)

    def with_checksums(self, checksums: Sequence[str]) -> Manifest:
        """This layout completed with one checksum per tensor, in order; raises BadManifest if they do not fit."""
        if len(checksums) != len(self.entries):
            raise BadManifest(f"{len(checksums)} checksums for a manifest of {len(self.entries)} tensors")
        entries = tuple(replace(e, checksum=c) for e, c in zip(self.entries, checksums, strict=True))
        return Manifest(entries=entries, piece_bytes=self.piece_bytes)

    def with_piece_bytes(self, piece_bytes: int) -> Manifest:
        """This layout, checksums pending, announcing checksums of the kind `piece_bytes` names."""
        return Manifest(entries=tuple(replace(e, checksum="") for e in self.entries), piece_bytes=piece_bytes)

    def __iter__(self) -> Iterator[TensorEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def total_bytes(self) -> int:
        return self.entries[-1].end if self.entries else 0

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over (name, dtype, shape, checksum), sorted by name: layout order does not count."""
        if self.pending:
            raise ValueError("a manifest whose checksums are pending has no fingerprint yet")
        digest = hashlib.sha256()
        for entry in sorted(self.entries, key=lambda e: e.name):
            shape = ",".join(map(str, entry.shape))
            digest.update(f"{entry.name}|{DTYPE_NAMES[entry.dtype]}|{shape}|{entry.checksum}\n".encode())
        return "sha256:" + digest.hexdigest()

    def views(self, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields each tensor as a typed view into a flat uint8 buffer holding this layout."""
        for entry in self.entries:
            raw = flat[entry.offset : entry.end]
            if entry.offset % entry.dtype.itemsize:
                raw = raw.clone()  # torch views need aligned offsets; only mixed-dtype layouts get here
            yield entry.name, raw.view(entry.dtype).view(entry.shape)


class StreamingChecksums:
    """Each tensor's checksum, computed from the layout's bytes fed in order, in pieces of any size.

    What lets the publisher hash a tensor while its chunks go out, instead of in a pass before them.
    With `piece_bytes` (the combinable kind), a caller that already has a whole piece's xxh3_64 (the
    chunk's own checksum) hands it to `add_digest` instead of feeding the bytes again.
    """

    def __init__(self, sizes: Sequence[int], piece_bytes: int = 0, *, start: int = 0) -> None:
        """`start`: where the first tensor sits in the flat layout (pieces are cut at multiples of G there)."""
        self.checksums: list[str] = []
        self.piece_bytes = piece_bytes
        self._sizes = sizes
        self._left = 0
        self._position = start  # in the flat layout
        self._digest = xxhash.xxh3_128()
        self._piece = xxhash.xxh3_64()
        self._piece_left = 0  # bytes until the current piece ends
        self._piece_fed = 0  # bytes of the current piece hashed so far
        self._digests: list[int] = []
        self._finish_empty()

    @property
    def done(self) -> bool:
        return len(self.checksums) == len(self._sizes)

    def update(self, piece: memoryview) -> None:
        while piece.nbytes:
            if self.done:
                raise ValueError("more bytes than the layout holds")
            take = min(self._left, piece.nbytes)
            if self.piece_bytes:
                take = min(take, self._piece_left)
                self._piece.update(piece[:take])
                self._piece_left -= take
                self._piece_fed += take
                if not self._piece_left:
                    self._digests.append(self._piece.intdigest())
                    self._piece.reset()
                    self._piece_fed = 0
            else:
                self._digest.update(piece[:take])
            piece = piece[take:]
            self._advance(take)

    def add_digest(self, nbytes: int, digest: int) -> None:
        """Takes the next `nbytes`, exactly one whole piece, by its xxh3_64 digest (combinable kind only)."""
        if not self.wants_piece(nbytes):
            raise ValueError("add_digest takes exactly one whole piece of a combinable-kind layout")
        self._digests.append(digest)
        self._piece_left = 0
        self._advance(nbytes)

    def wants_piece(self, nbytes: int) -> bool:
        """Whether the next `nbytes` are exactly one whole piece, none of it fed yet (so `add_digest` fits)."""
        return bool(self.piece_bytes) and not self.done and not self._piece_fed and nbytes == self._piece_left

    def _piece_size(self) -> int:
        """The size of the piece starting at the current position (to the next multiple of G or the tensor end)."""
        g = self.piece_bytes
        return min(self._left, g - self._position % g)

    def _advance(self, n: int) -> None:
        self._position += n
        self._left -= n
        if not self._left:
            if self.piece_bytes:
                self.checksums.append(piece_checksum(self.piece_bytes, self._digests))
                self._digests.clear()
            else:
                self.checksums.append(CHECKSUM_PREFIX + self._digest.hexdigest())
                self._digest.reset()
            self._finish_empty()
        if self.piece_bytes and not self._piece_left and not self.done:
            self._piece_left = self._piece_size()

    def _finish_empty(self) -> None:
        """Closes zero-byte tensors (they get no bytes) and sets up the next one."""
        while not self.done and not self._sizes[len(self.checksums)]:
            self.checksums.append(piece_checksum(self.piece_bytes, ()) if self.piece_bytes else tensor_checksum(b""))
        self._left = self._sizes[len(self.checksums)] if not self.done else 0
        if self.piece_bytes and not self.done:
            self._piece_left = self._piece_size()


def build_manifest(
    named_tensors: Iterable[tuple[str, torch.Tensor]], checksums: Iterable[str] | None = None, *, piece_bytes: int = 0
) -> Manifest:
    """Lays out contiguous CPU tensors back to back and checksums each one (of the kind `piece_bytes` names).

    `checksums`, one per tensor in order, are taken as given: a caller that already hashed the bytes
    (the delta diff hashes while it compares) saves a pass over memory.
    """
    named = list(named_tensors)
    layout = build_layout(named)
    if checksums is not None:
        given = list(checksums)
    elif piece_bytes:
        sums = StreamingChecksums([e.byte_size for e in layout], piece_bytes)
        for _, t in named:
            sums.update(tensor_bytes(t))
        given = sums.checksums
    else:
        given = [tensor_checksum(tensor_bytes(t)) for _, t in named]
    return layout.with_piece_bytes(piece_bytes).with_checksums(given)


def build_layout(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Manifest:
    """Lays out contiguous CPU tensors back to back, checksums pending (the publisher hashes as it sends)."""
    entries = []
    offset = 0
    for name, tensor in named_tensors:
        size = tensor.numel() * tensor.element_size()
        entries.append(
            TensorEntry(
                name=name, dtype=tensor.dtype, shape=tuple(tensor.shape), offset=offset, byte_size=size, checksum=""
            )
        )
        offset += size
    return Manifest(entries=tuple(entries))


def manifest_of_state(state: Mapping[str, torch.Tensor], *, piece_bytes: int = PIECE_BYTES) -> Manifest:
    """Manifest of a state dict as it would be sent: bf16, contiguous, tied tensors once.

    Its fingerprint is the one a default push of `state` commits (full, delta or shared memory, any chunk
    size). `piece_bytes` picks another checksum kind: 0 for plain xxh3_128 (`Publisher(piece_checksums=False)`),
    G for what a sharded push of this state announces with chunks of G bytes (trainer_side/sharded/collective.py)."""
    return build_manifest(wire_tensors(state), piece_bytes=piece_bytes)


def wire_tensors(state: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Casts a state dict to contiguous bf16 CPU tensors, skipping tensors that alias one already seen."""
    for name, tensor in wire_sources(state):
        yield name, to_wire(tensor)


def wire_sources(state: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a state dict that go on the wire, as they are (any float dtype, any device), by name.

    Non-float tensors are left out, and tensors that alias one already seen: tied weights
    (embed_tokens / lm_head) share storage; sending them once is both smaller and what the
    receiving model expects, since it ties them again itself. The rest go in name order: the combinable
    checksum depends on where a tensor sits in the layout, so one canonical layout keeps the fingerprint
    independent of the state dict's order (a checkpoint on disk and the trainer's model agree).
    """
    seen: set[tuple[object, ...]] = set()
    out = []
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out.append((name, tensor))
    return sorted(out, key=lambda item: item[0])


def to_wire(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as it travels: bf16, contiguous, on the CPU (itself, if it already is)."""
    return tensor.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()


def wire_layout(sources: Iterable[tuple[str, torch.Tensor]]) -> Manifest:
    """The layout (checksums pending) `sources` will have on the wire, without casting or copying them."""
    return build_layout((name, torch.empty(t.shape, dtype=torch.bfloat16, device="meta")) for name, t in sources)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
