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
    "Manifest",
    "StreamingChecksums",
    "TensorEntry",
    "build_layout",
    "build_manifest",
    "manifest_of_state",
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


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Returns a zero-copy byte view of a contiguous CPU tensor."""
    flat = tensor.detach().reshape(-1).view(torch.uint8)
    return flat.numpy().data.cast("B")


def tensor_checksum(data: bytes | memoryview) -> str:
    """xxh3_128 of a tensor's bytes: fast enough (~30 GB/s) to never bound a sync."""
    return CHECKSUM_PREFIX + xxhash.xxh3_128_hexdigest(data)


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
    """Every tensor of a version, tiling [0, total_bytes) in order."""

    entries: tuple[TensorEntry, ...]

    def __post_init__(self) -> None:
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
            if not _CHECKSUM.fullmatch(entry.checksum) and not (self.pending and not entry.checksum):
                raise BadManifest(f"tensor {entry.name!r} checksum must be {CHECKSUM_PREFIX!r} and 32 hex digits")
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
        return Manifest(entries=tuple(replace(e, checksum=c) for e, c in zip(self.entries, checksums, strict=True)))

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
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        self.checksums: list[str] = []
        self._sizes = sizes
        self._left = 0
        self._digest = xxhash.xxh3_128()
        self._finish_empty()

    @property
    def done(self) -> bool:
        return len(self.checksums) == len(self._sizes)

    def update(self, piece: memoryview) -> None:
        while piece.nbytes:
            if self.done:
                raise ValueError("more bytes than the layout holds")
            take = min(self._left, piece.nbytes)
            self._digest.update(piece[:take])
            piece, self._left = piece[take:], self._left - take
            if not self._left:
                self.checksums.append(CHECKSUM_PREFIX + self._digest.hexdigest())
                self._digest.reset()
                self._finish_empty()

    def _finish_empty(self) -> None:
        """Closes zero-byte tensors (they get no bytes) and sets up the next one."""
        while not self.done and not self._sizes[len(self.checksums)]:
            self.checksums.append(tensor_checksum(b""))
        self._left = self._sizes[len(self.checksums)] if not self.done else 0


def build_manifest(
    named_tensors: Iterable[tuple[str, torch.Tensor]], checksums: Iterable[str] | None = None
) -> Manifest:
    """Lays out contiguous CPU tensors back to back and checksums each one.

    `checksums`, one per tensor in order, are taken as given: a caller that already hashed the bytes
    (the delta diff hashes while it compares) saves a pass over memory.
    """
    named = list(named_tensors)
    given = list(checksums) if checksums is not None else [tensor_checksum(tensor_bytes(t)) for _, t in named]
    return build_layout(named).with_checksums(given)


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


def manifest_of_state(state: Mapping[str, torch.Tensor]) -> Manifest:
    """Manifest of a state dict as it would be sent: bf16, contiguous, tied tensors once."""
    return build_manifest(wire_tensors(state))


def wire_tensors(state: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Casts a state dict to contiguous bf16 CPU tensors, skipping tensors that alias one already seen."""
    for name, tensor in wire_sources(state):
        yield name, to_wire(tensor)


def wire_sources(state: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a state dict that go on the wire, as they are (any float dtype, any device).

    Non-float tensors are left out, and tensors that alias one already seen: tied weights
    (embed_tokens / lm_head) share storage; sending them once is both smaller and what the
    receiving model expects, since it ties them again itself.
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
    return out


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
