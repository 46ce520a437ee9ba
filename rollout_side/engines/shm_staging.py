"""Staging buffers in /dev/shm files: the pages both the rollout and vLLM's worker processes map.

The engine allocates them (ShmStaging), the worker extension (vllm_worker.py) and the boot-time loader
(vllm_loader.py) read them by layout; neither of those imports the other for this.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch

from weightsync import shm
from weightsync.shm import SHM_DIR

__all__ = ["SHM_DIR", "LayoutEntry", "ShmStaging", "layout_views", "remove_abandoned"]

logger = logging.getLogger(__name__)

# (name, torch dtype name such as "bfloat16", shape, byte offset in the file, byte size): plain values,
# because collective_rpc serialises its arguments and tensors do not survive that in multiprocess mode.
LayoutEntry = tuple[str, str, list[int], int, int]


def layout_views(flat: torch.Tensor, layout: list[LayoutEntry]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, typed view of `flat`) for every entry: what vLLM's load_weights takes, with no copy."""
    for name, dtype, shape, offset, size in layout:
        yield name, flat[offset : offset + size].view(getattr(torch, dtype)).view(shape)


class ShmStaging:
    """Staging buffers backed by /dev/shm files, so vLLM's worker process can map the same pages.

    A file lives as long as its buffer (a finalizer unlinks it when the tensor is collected), and
    `close()` unlinks whatever is left. Its owner holds a shared flock on it, so a file nobody holds was
    left by a process that could not clean up (SIGKILL: the OOM killer): each new ShmStaging removes
    those, and any other file of weightsync's there that nobody holds (weightsync/shm.py). On Kubernetes
    /dev/shm is the pod's memory-backed emptyDir, which outlives a crashed container: without this,
    every restart would leak one model's worth of memory.
    """

    def __init__(self, directory: Path = SHM_DIR) -> None:
        self._dir = directory
        # By storage address: (file path, file size, finalizer that unlinks the file and drops the lock).
        self._files: dict[int, tuple[str, int, weakref.finalize[[int, str, int], torch.Tensor]]] = {}
        self.removed = remove_abandoned(directory)

    def allocate(self, nbytes: int) -> torch.Tensor:
        """A buffer of `nbytes` over a new staging file, its memory reserved now (see weightsync/shm.py).

        Raises OutOfSharedMemory (RESOURCE_EXHAUSTED to the trainer) if the directory has no room for it.
        """
        path = self._dir / f"weightsync-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        size = max(nbytes, 1)  # mmap refuses empty files
        fd = shm.create(path, size)
        try:
            flat = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)[:nbytes]
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        address = flat.untyped_storage().data_ptr()
        self._files[address] = (str(path), size, weakref.finalize(flat, self._drop, address, str(path), fd))
        return flat

    def locate(self, buffer: torch.Tensor) -> tuple[str, int, int] | None:
        """(file path, file size, byte offset of `buffer` in the file), or None if not ours."""
        address = buffer.untyped_storage().data_ptr()
        if address not in self._files:
            return None
        path, size, _ = self._files[address]
        return path, size, buffer.data_ptr() - address

    def close(self) -> None:
        for _, _, finalizer in list(self._files.values()):
            finalizer()

    def _drop(self, address: int, path: str, fd: int) -> None:
        self._files.pop(address, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def remove_abandoned(directory: Path = SHM_DIR) -> int:
    """Unlinks weightsync's files in `directory` that no process holds (see ShmStaging); returns how many."""
    return shm.sweep(directory)
