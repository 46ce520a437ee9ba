"""Files weightsync keeps in shared memory (/dev/shm, a memory-backed emptyDir): held while their owner lives.

Every such file (a rollout's staging buffers and boot handoff, a trainer's version file) is held with a
shared flock from before it has a name until its owner closes it: created unnamed (O_TMPFILE), locked,
then linked into place. A named file nobody holds was left by an owner that could not clean up (SIGKILL:
the OOM killer), and `sweep` removes it. A lock, unlike a pid, tells across pid namespaces (the
containers of a pod share the emptyDir but not their pids) and cannot be fooled by a reused pid.

Their memory is reserved when they are sized (`reserve`, posix_fallocate): a file only truncated to its
size reserves nothing, and a writer then dies of SIGBUS at the first page that does not fit. Reserving
turns that into OutOfSharedMemory, said while nothing is written yet.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
from pathlib import Path

from weightsync.errors import OutOfSharedMemory

__all__ = ["SHM_DIR", "create", "replace", "reserve", "sweep"]

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")

# weightsync-<pid>-<hex>, then what it is: nothing (staging), -handoff.json (and its .tmp), .bin (version file).
OURS = re.compile(r"weightsync-\d+-[0-9a-f]+(?:-handoff\.json|-handoff\.tmp|\.bin)?")


def create(path: Path, size: int = 0) -> int:
    """A new file at `path` (which must not exist) of `size` bytes reserved, held by the returned fd.

    Raises OutOfSharedMemory if `size` does not fit; then no file is left behind.
    """
    fd, named = _open(path)
    try:
        reserve(fd, size, path)
        if not named:
            _link(fd, path)
    except BaseException:
        os.close(fd)
        if named:
            path.unlink(missing_ok=True)
        raise
    return fd


def replace(path: Path, data: bytes) -> int:
    """Puts a new file holding `data` at `path` in one rename; returns the fd that holds it.

    A reader opening `path` sees the old content or the new, whole. The caller closes the fd that held
    the old file once this returns.
    """
    tmp = path.with_suffix(".tmp")
    fd, named = _open(tmp)
    try:
        view = memoryview(data)
        while view.nbytes:
            view = view[os.write(fd, view) :]
        if not named:
            _link(fd, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return fd


def reserve(fd: int, size: int, path: Path) -> None:
    """Gives the file `size` bytes of memory now (posix_fallocate); OutOfSharedMemory if they do not fit."""
    if size <= os.fstat(fd).st_size:
        os.ftruncate(fd, size)  # shrinking frees; no reservation needed
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise
        raise OutOfSharedMemory(_no_room(path, size)) from None


def sweep(directory: Path = SHM_DIR) -> int:
    """Unlinks weightsync's files in `directory` that no process holds; returns how many."""
    removed = 0
    for path in directory.glob("weightsync-*"):
        if not OURS.fullmatch(path.name):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone meanwhile, or not ours to read
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its owner is alive
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            path.unlink()
            removed += 1
            logger.warning("removed %s (%.1f MB), left by a process that was killed", path, size / 1e6)
    return removed


def _open(path: Path) -> tuple[int, bool]:
    """A new file for `path`, held with a shared lock; and whether it is at `path` already.

    It is unnamed (O_TMPFILE) where the file system allows, so no sweep ever sees it unheld; elsewhere it
    is created at `path` and locked at once after (a sweep in between could take it: microseconds).
    """
    try:
        fd = os.open(path.parent, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        named = False
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        named = True
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd, named


def _link(fd: int, path: Path) -> None:
    """Names the unnamed file `fd`: /proc's link to an open file leads to its inode, which linkat follows
    (given a directory fd, os.link calls linkat with AT_SYMLINK_FOLLOW; plain link() would not follow)."""
    fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(str(fd), path, src_dir_fd=fds, follow_symlinks=True)
    finally:
        os.close(fds)


def _no_room(path: Path, size: int) -> str:
    directory = path.parent
    try:
        stat = os.statvfs(directory)
        total, free = stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize
        room = f"{directory} holds {total / 1e6:.1f} MB, {free / 1e6:.1f} MB free"
    except OSError:
        room = f"{directory} is full"
    return (
        f"{size / 1e6:.1f} MB do not fit in shared memory: {room}. Give it room for one model's bytes "
        f"twice over, plus vLLM's own use: `docker run --shm-size`, or the sizeLimit of the pod's "
        f"memory-backed emptyDir mounted at {directory}"
    )
