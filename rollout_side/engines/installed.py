"""Installed-weight verification: what an engine holds after a load, read back and held to the trainer's checksums.

Every byte of a version is checked where it lands in staging (update/staging.py: each chunk is hashed
after its copy, over the staged bytes), and again, after the engine has loaded it, as the engine holds it
wherever that is other memory. The second check is this module's: each engine reads its tensors back
under their Hugging Face names (vLLM undoes its own layout, worker by worker: vllm_readback.py) and hashes
them as the trainer did; `compare` then names the tensors that differ or that the engine never received.
Loads that lose weights silently (a name that no longer maps, a skipped tensor, a corrupted copy) are
caught before the version serves.

The torch engine on CPU installs the staging views themselves as its parameters (zero-copy): the
receiver's sums, taken over that very memory as it landed, are its installed check, and after the swap it
only proves that each parameter is that memory (`same_memory`, `sums_held`): the bytes it serves are the
bytes hashed, at one hash pass per byte. A parameter that is other memory is hashed where it lies. What this
cannot see is the hashed memory itself written after it landed: the staging buffer belongs to the update,
then to the engine, and nothing else writes to it (a fault there shows at the next `status --verify`, which
hashes everything).

`Failpoints` are for tests only: read from WEIGHTSYNC_FAILPOINTS when an engine (or receiver) starts, they
make a load skip one tensor, install one with a flipped byte, flip a byte of one staged tensor after the
receiver's checks, or land every chunk with a flipped byte, so tests can prove which check sees each.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from weightsync.errors import InstalledMismatch, StagedMismatch
from weightsync.manifest import Manifest, entry_checksum, tensor_bytes

__all__ = [
    "FAILPOINTS_ENV",
    "Failpoints",
    "ReadBackEntry",
    "Verification",
    "compare",
    "corrupted_copy",
    "flip_byte",
    "read_back_entries",
    "same_memory",
    "sum_of",
    "sums_held",
    "sums_of",
]

FAILPOINTS_ENV = "WEIGHTSYNC_FAILPOINTS"
NAMED = 3  # tensors a failure names
# Threads that hash a read-back: xxhash lets go of the interpreter lock, so tensors hash in parallel (the
# read-back sits in the swap pause; one thread measured about 1.5x slower on this 2-core machine).
HASH_THREADS = min(4, os.cpu_count() or 1)
_hashing: ThreadPoolExecutor | None = None

# (Hugging Face name, byte offset in the layout, byte size): what a worker needs to hash a tensor as the trainer did.
ReadBackEntry = tuple[str, int, int]


@dataclass(frozen=True, kw_only=True, slots=True)
class Verification:
    """One read-back of the installed weights: `mismatched` lists "name" (or "name@worker") that differ."""

    version: int
    tensors: int  # checked, per worker
    workers: int
    at: float  # wall-clock time (time.time()) it finished
    seconds: float
    mismatched: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()  # in the manifest, not found in the engine
    # What was read: tensor name -> checksum as the engine holds it (the HTTP /weight_checker's answer).
    # Where workers disagree, each worker's own as "name@workerN"; a tensor not found has no entry.
    digests: Mapping[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.mismatched and not self.missing

    def error(self, *, staged: bool = False) -> InstalledMismatch:
        """The refusal a failed verification becomes; `staged`: it ran before the swap (StagedMismatch)."""
        named = [*self.missing, *self.mismatched][:NAMED]
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} never received")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} differ from their checksums")
        what, then, kind = (
            ("as staged for the engine", "the version served before keeps serving", StagedMismatch)
            if staged
            else (
                "as the engine holds it",
                "the rollout serves nothing until a later version verifies",
                InstalledMismatch,
            )
        )
        return kind(
            f"version {self.version} {what} fails verification ({', '.join(parts)}): "
            f"{', '.join(named)}{' ...' if len(self.missing) + len(self.mismatched) > NAMED else ''}; {then}",
            metadata={"tensors": ",".join(named), "version": str(self.version)},
        )


def read_back_entries(manifest: Manifest) -> list[ReadBackEntry]:
    """The manifest as plain values for a worker RPC."""
    return [(e.name, e.offset, e.byte_size) for e in manifest]


def sum_of(tensor: torch.Tensor, offset: int, piece_bytes: int) -> str:
    """The checksum of a tensor read back from an engine (any device), as its manifest entry defines it."""
    return entry_checksum(tensor_bytes(tensor.detach().to("cpu").contiguous()), offset, piece_bytes)


def sums_of(tensors: Iterable[tuple[torch.Tensor | None, int]], piece_bytes: int) -> list[str]:
    """sum_of of each (tensor, offset), "" for None, in order, hashed on HASH_THREADS threads.

    `tensors` is consumed on the calling thread (vLLM's read-back runs collectives there, in order), at
    most 2 x HASH_THREADS ahead of the hashing, so only that many read-back tensors are held at once.
    """
    global _hashing
    if _hashing is None:
        _hashing = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="weightsync-read-back")
    pending: deque[Future[str]] = deque()
    sums: list[str] = []
    for tensor, offset in tensors:
        if len(pending) >= 2 * HASH_THREADS:
            sums.append(pending.popleft().result())
        if tensor is None:
            pending.append(_ready(""))
        else:
            pending.append(_hashing.submit(sum_of, tensor, offset, piece_bytes))
    sums.extend(future.result() for future in pending)
    return sums


def same_memory(held: torch.Tensor | None, hashed: torch.Tensor) -> bool:
    """Whether `held` is the very tensor `hashed` (address, shape, strides, dtype, device): a zero-copy install."""
    return (
        held is not None
        and held.data_ptr() == hashed.data_ptr()
        and held.shape == hashed.shape
        and held.stride() == hashed.stride()
        and held.dtype == hashed.dtype
        and held.device == hashed.device
    )


def sums_held(
    manifest: Manifest, held: Sequence[torch.Tensor | None], hashed: Sequence[torch.Tensor], sums: Sequence[str]
) -> list[str]:
    """The checksums of what an engine holds (`held`, None: not found as sent), after it installed the `hashed`
    views themselves, whose `sums` were taken before its swap.

    A tensor held in that very memory keeps its sum without reading a byte; any other is hashed where it lies
    (skipped, copied elsewhere), so nothing is vouched for that was not hashed as held.
    """
    return [
        digest
        if same_memory(tensor, view)
        else ("" if tensor is None else sum_of(tensor, e.offset, manifest.piece_bytes))
        for e, tensor, view, digest in zip(manifest, held, hashed, sums, strict=True)
    ]


def _ready(value: str) -> Future[str]:
    future: Future[str] = Future()
    future.set_result(value)
    return future


def compare(manifest: Manifest, version: int, per_worker: Sequence[Sequence[str]], started: float) -> Verification:
    """Holds each worker's read-back checksums ("" = not found) to the manifest's; `started`: perf_counter()."""
    workers = len(per_worker)
    mismatched: list[str] = []
    missing: list[str] = []
    digests: dict[str, str] = {}
    for index, entry in enumerate(manifest):
        held = [sums[index] for sums in per_worker]
        if len(set(held)) == 1:
            digests.update({entry.name: held[0]} if held[0] else {})
        else:
            digests.update({f"{entry.name}@worker{rank}": got for rank, got in enumerate(held) if got})
    for rank, sums in enumerate(per_worker):
        where = f"@worker{rank}" if workers > 1 else ""
        for entry, got in zip(manifest, sums, strict=True):
            if not got:
                missing.append(entry.name + where)
            elif got != entry.checksum:
                mismatched.append(entry.name + where)
    return Verification(
        version=version,
        tensors=len(manifest),
        workers=workers,
        at=time.time(),
        seconds=time.perf_counter() - started,
        mismatched=tuple(mismatched),
        missing=tuple(missing),
        digests=digests,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class Failpoints:
    """Tests only: faults a load injects, from WEIGHTSYNC_FAILPOINTS (comma-separated).

    `skip-load[=NAME]`: the load leaves tensor NAME (default: the manifest's first) as it was.
    `corrupt-installed[=NAME]`: the engine ends up holding other bytes for tensor NAME than were verified
    as staged. Where the load copies (vLLM, torch on CUDA), one byte of the installed copy is flipped (on the
    first worker only, where there are several). The torch engine on CPU installs the staged memory itself,
    already hashed before the swap; flipping it there would test nothing the engine guards (see the module
    docstring), and flipping it before that hash would be caught by the hash, not by the installed check. So
    it installs a copy with one byte flipped instead: a parameter holding other bytes than were hashed, which
    only the check after the swap can see.
    `corrupt-staged[=NAME]`: one byte of tensor NAME in staging is flipped after the receiver's checks,
    before the engine installs it: the staged memory changed after it was hashed (torch on CPU takes the
    receiver's sums, so only `status --verify` sees it; an engine that copies hashes the copy).
    `corrupt-landed`: the receiver flips one byte of each chunk in staging right after copying it there,
    before checking it: what only a check over the staged bytes, not the message, can see.
    """

    skip: str | None = None
    corrupt: str | None = None
    corrupt_staged: str | None = None
    corrupt_landed: bool = False
    unknown: tuple[str, ...] = field(default=())

    @classmethod
    def from_environ(cls) -> Failpoints:
        skip = corrupt = corrupt_staged = None
        landed = False
        unknown = []
        for item in filter(None, (s.strip() for s in os.environ.get(FAILPOINTS_ENV, "").split(","))):
            key, _, arg = item.partition("=")
            if key == "skip-load":
                skip = arg
            elif key == "corrupt-installed":
                corrupt = arg
            elif key == "corrupt-staged":
                corrupt_staged = arg
            elif key == "corrupt-landed":
                landed = True
            else:
                unknown.append(item)
        return cls(
            skip=skip, corrupt=corrupt, corrupt_staged=corrupt_staged, corrupt_landed=landed, unknown=tuple(unknown)
        )

    def skipped(self, names: Sequence[str]) -> str | None:
        """The tensor a load of `names` leaves out, if any."""
        return _target(self.skip, names)

    def corrupted(self, names: Sequence[str]) -> str | None:
        """The tensor whose installed copy a load of `names` corrupts, if any."""
        return _target(self.corrupt, names)

    def staged_corrupted(self, names: Sequence[str]) -> str | None:
        """The tensor whose staged bytes a load of `names` corrupts before the engine installs them, if any."""
        return _target(self.corrupt_staged, names)


def _target(arg: str | None, names: Sequence[str]) -> str | None:
    if arg is None or not names:
        return None
    return arg or names[0]


def flip_byte(tensor: torch.Tensor) -> None:
    """Flips the lowest bit of the tensor's first byte, in place (the corrupt-installed failpoint)."""
    raw = tensor.data.reshape(-1).view(torch.uint8)
    raw[0] = raw[0] ^ 1


def corrupted_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` with flip_byte applied (corrupt-installed where the engine installs staging itself)."""
    copy = tensor.detach().clone()
    flip_byte(copy)
    return copy
