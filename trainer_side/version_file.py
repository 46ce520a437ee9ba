"""Writes each version once into the version file, so rollouts on the trainer's host read it from shared
memory instead of receiving it over sockets (rollout_side/update/version_file.py is the reading half).

A trainer and rollouts on one host (containers of a pod sharing a memory-backed emptyDir, or processes
sharing /dev/shm) need not push bytes through sockets at all: the publisher writes a version once into a
file there, each rollout copies it into its own staging buffer, and the handshake, checksums and commit
are the usual gRPC ones. The file is kept and rewritten in place for every version: its pages stay allocated, and
writing into warm pages runs several times faster than into fresh ones.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from weightsync import shm
from weightsync.manifest import StreamingChecksums

__all__ = ["VersionFileWriter"]

_BLOCK = 4 << 20  # what one progress message announces to the rollouts (smaller tensors go together)


class VersionFileWriter:
    """A file under `directory` holding the latest version's flat layout; `blocks` replaces its content."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"shared-memory directory {directory} does not exist")
        shm.sweep(directory)  # a killed trainer's file, which nobody holds any more
        self.path = directory / f"weightsync-{os.getpid()}-{id(self):x}.bin"
        self._fd = shm.create(self.path)  # held while this writer lives (weightsync/shm.py)
        self._map: mmap.mmap | None = None
        self.checksums: list[str] = []  # of the version last written by `blocks(..., checksum=True)`

    def resize(self, size: int) -> None:
        """Gives the file its final size before a rollout opens it (it checks the size when it does).

        Its memory is reserved now: OutOfSharedMemory if the directory has no room for it, where a file
        only truncated to its size would end the trainer with SIGBUS at the first page that does not fit.
        """
        self._mapping(size).release()

    def blocks(
        self, payloads: Sequence[memoryview], sizes: Sequence[int], *, checksum: bool, piece_bytes: int = 0
    ) -> Iterator[int]:
        """Writes the tensors' bytes back to back, asking for each in turn, and yields the bytes written
        after each block, so rollouts can copy them while the rest is written. With `checksum` (the
        version's checksums are not known yet), each block is hashed as it is written and `checksums`
        holds each tensor's (of the kind `piece_bytes` names) once the last block is."""
        self.checksums = []
        view = self._mapping(sum(sizes))
        sums = StreamingChecksums(sizes, piece_bytes) if checksum else None
        position = announced = 0
        try:
            for i in range(len(sizes)):
                payload = payloads[i]
                for start in range(0, payload.nbytes, _BLOCK):
                    block = payload[start : start + _BLOCK]
                    target = view[position : position + block.nbytes]
                    target[:] = block
                    if sums is not None:
                        sums.update(target)
                    target.release()
                    position += block.nbytes
                    if position - announced >= _BLOCK:  # small tensors are announced together
                        yield position
                        announced = position
            if position > announced:
                yield position
        finally:
            view.release()
        if sums is not None:
            if not sums.done:  # only zero-byte tensors can be left, and update() closes those
                raise RuntimeError("the shared-memory file does not cover every tensor")
            self.checksums = sums.checksums

    def _mapping(self, size: int) -> memoryview:
        if size == 0:
            shm.reserve(self._fd, 0, self.path)
            return memoryview(bytearray())
        if self._map is None or len(self._map) != size:
            if self._map is not None:
                self._map.close()
                self._map = None
            shm.reserve(self._fd, size, self.path)
            self._map = mmap.mmap(self._fd, size)
        return memoryview(self._map)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
