"""A co-located trainer's version file, read straight into staging: the rollout's half of shared memory.

The trainer writes it (trainer_side/version_file.py, VersionFileWriter); it holds a full version in
the manifest's flat layout. It is read with pread straight into the staging buffer: one copy from the
page cache and no mapping. Mapping it cost page faults on every update (44 ms against 27 ms for
256 MiB, one-off), and a file cut short by its writer raises SIGBUS on a mapped read, where pread
just comes back short. Reading goes in blocks of a few MiB on the event loop, yielding between them,
so Generate keeps being served; the trainer may announce the file a part at a time while it is still
writing the rest (BeginUpdateRequest.shared_memory_streamed).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from weightsync.errors import ChunkCorrupt, SharedMemoryRefused, UnknownUpdate

__all__ = ["BLOCK", "VersionFileReader", "open_reader", "resolve"]

BLOCK = 4 << 20


def resolve(directory: Path | None, name: str) -> Path:
    """The file `name` if it lies in `directory` (symlinks resolved) and is a regular file."""
    if directory is None:
        raise SharedMemoryRefused(
            "this rollout takes no shared-memory files; start it with --shared-memory-dir to allow them"
        )
    path = Path(name).resolve()
    if path.parent != directory:
        raise SharedMemoryRefused(f"{name!r} is not in the shared-memory directory {directory}")
    if not path.is_file():
        raise SharedMemoryRefused(f"{name!r} is not a regular file")
    return path


def open_reader(directory: Path | None, name: str, size: int) -> VersionFileReader:
    """Opens the version file `name` in `directory`, which must lay out `size` bytes; SharedMemoryRefused if not."""
    try:
        return VersionFileReader(resolve(directory, name), size)
    except (OSError, ValueError) as error:
        raise SharedMemoryRefused(f"cannot read the shared-memory file {name!r}: {error}") from None


class VersionFileReader:
    """An open version file of `size` bytes and how much of it is in staging (`position`)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.position = 0
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        actual = os.fstat(self._fd).st_size
        if actual != size:
            self.close()
            raise ChunkCorrupt(f"{path} has {actual} bytes; the manifest lays out {size}")

    async def read(
        self, staged: memoryview, upto: int, on_block: Callable[[int], None], current: Callable[[], bool]
    ) -> int:
        """Reads [position, upto) into `staged` at the same offsets; returns the bytes read.

        `on_block(end)` follows every block (the caller checksums what is in by then); `current()`
        says whether the update is still the one in progress after each yield.
        """
        if upto > self.size:
            raise ChunkCorrupt(f"the file is announced up to byte {upto}, past the {self.size} bytes it lays out")
        if upto < self.position:
            raise ChunkCorrupt(f"the file is announced up to byte {upto}, back from {self.position} announced before")
        start = self.position
        while self.position < upto:
            block = staged[self.position : min(self.position + BLOCK, upto)]
            got = os.preadv(self._fd, [block], self.position)
            if got != block.nbytes:
                raise ChunkCorrupt(
                    f"{self.path} ended at byte {self.position + got} while being read; it lays out {self.size}"
                )
            self.position += got
            on_block(self.position)
            await asyncio.sleep(0)  # let Generate and other calls in between blocks
            if not current():
                raise UnknownUpdate("the update was aborted while its file was being read")
        return self.position - start

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
