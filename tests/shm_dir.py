"""A /dev/shm of the test's own: a small tmpfs it can fill, and rollouts that see it as their /dev/shm.

Mounting needs root (CAP_SYS_ADMIN); where it is refused the test is skipped. A rollout started through
`with_shm` runs in a mount namespace of its own in which `directory` is bound over /dev/shm: it sees
only that, sized as the test chose, and the test sees exactly what it leaves there, with no other
process's files mixed in. Its pid stays the rollout's own (unshare and sh exec it).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

__all__ = ["tmpfs", "with_shm"]


@contextlib.contextmanager
def tmpfs(directory: Path, size: str = "8m") -> Iterator[Path]:
    """`directory` as a fresh tmpfs of `size` (mount's units) for the duration; skips the test if refused."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def with_shm(directory: Path, command: Sequence[str]) -> list[str]:
    """`command` run with `directory` bound over /dev/shm, in its own mount namespace."""
    script = 'mount --bind "$0" /dev/shm && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(directory), *command]
