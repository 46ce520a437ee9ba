"""weightsync's files in /dev/shm: one killed with its owner is removed by the next rollout, and one
that does not fit is refused before a byte is written.

On Kubernetes /dev/shm is the pod's memory-backed emptyDir and outlives a container the OOM killer
ended; these tests kill a real process holding each kind of file (a vLLM rollout's staging buffer and
boot handoff, a trainer's version file) with SIGKILL, as that does. Its size is the emptyDir's
sizeLimit (64 MiB under Docker's default): a file reserved past it must be a clean error, not a SIGBUS.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rollout_side.engines.shm_staging import ShmStaging
from rollout_side.engines.vllm_loader import Handoff
from trainer_side.version_file import VersionFileWriter
from weightsync.errors import OutOfSharedMemory, TooLarge

from shm_dir import tmpfs

HOLDER = """
import sys, time
from pathlib import Path
from rollout_side.engines.shm_staging import ShmStaging
from rollout_side.engines.vllm_loader import Handoff
from trainer_side.version_file import VersionFileWriter
directory = Path(sys.argv[1])
staging = ShmStaging(directory)
flat = staging.allocate(1 << 20)
flat.fill_(7)
handoff = Handoff(directory)
handoff.expect()
writer = VersionFileWriter(directory)
writer.resize(4096)
print("ready", flush=True)
time.sleep(600)
"""
MIB = 1 << 20


def _holder(directory: Path) -> subprocess.Popen[str]:
    """A process that holds a staging file of 1 MiB, a handoff file and a version file in `directory`
    until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_a_staging_file_left_by_a_killed_rollout_is_removed_and_live_ones_are_kept(tmp_path: Path) -> None:
    killed, alive = _holder(tmp_path), _holder(tmp_path)
    try:
        killed_files = {p for p in tmp_path.iterdir() if p.name.startswith(f"weightsync-{killed.pid}-")}
        alive_files = {p for p in tmp_path.iterdir() if p.name.startswith(f"weightsync-{alive.pid}-")}
        assert len(killed_files) == len(alive_files) == 3  # staging, handoff, version file
        killed.send_signal(signal.SIGKILL)  # no finaliser runs: the files stay, as after the OOM killer
        killed.wait(30)
        assert all(p.exists() for p in killed_files)
        # Files of ours by name that nobody holds (left by a killed process) go too; other names stay.
        orphans = [tmp_path / "weightsync-1-0123456789ab-handoff.json", tmp_path / "weightsync-1-00ff.bin"]
        unrelated = [tmp_path / "weightsync-notes.txt", tmp_path / "other-0123456789ab"]
        for path in orphans + unrelated:
            path.write_text("left here")

        mine = ShmStaging(tmp_path)
        own = mine.allocate(4096)
        assert mine.removed == len(killed_files) + len(orphans)
        assert not any(p.exists() for p in killed_files | set(orphans))
        assert all(p.exists() for p in alive_files), "a live rollout's staging file was removed"
        assert all(p.exists() for p in unrelated)

        # Our own file is held too: another newcomer keeps it, and it goes when we close.
        assert ShmStaging(tmp_path).removed == 0
        ours = {p for p in tmp_path.iterdir() if p.name.startswith(f"weightsync-{os.getpid()}-")}
        assert len(ours) == 1 and own.numel() == 4096
        mine.close()
        assert not any(p.exists() for p in ours)
    finally:
        for proc in (killed, alive):
            proc.kill()
            proc.wait(30)


def test_a_staging_file_that_does_not_fit_is_refused_with_what_to_do_and_leaves_nothing(tmp_path: Path) -> None:
    """ftruncate would hand out the file and the first write past the room would be a SIGBUS."""
    with tmpfs(tmp_path / "shm", "8m") as shm:
        staging = ShmStaging(shm)
        with pytest.raises(OutOfSharedMemory) as refused:
            staging.allocate(16 * MIB)
        assert isinstance(refused.value, TooLarge)  # RESOURCE_EXHAUSTED to the trainer
        message = str(refused.value)
        for said in ("16.8 MB", f"{shm} holds 8.4 MB", "--shm-size", "sizeLimit"):
            assert said in message, message
        assert list(shm.iterdir()) == []
        assert os.statvfs(shm).f_bfree == os.statvfs(shm).f_blocks, "the refused reservation was kept"

        fits = staging.allocate(4 * MIB)  # the directory still serves what fits
        fits.fill_(1)
        assert len(list(shm.iterdir())) == 1
        staging.close()
        assert list(shm.iterdir()) == []


def test_a_version_file_that_does_not_fit_is_refused_and_the_writer_goes_on(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "shm", "8m") as shm:
        writer = VersionFileWriter(shm)
        with pytest.raises(OutOfSharedMemory, match="do not fit in shared memory"):
            writer.resize(16 * MIB)
        assert writer.path.stat().st_size == 0
        writer.resize(MIB)
        assert list(writer.blocks([memoryview(bytes(MIB))], [MIB], checksum=False))[-1] == MIB
        writer.close()
        assert list(shm.iterdir()) == []


def test_a_handoff_file_is_replaced_whole_and_withdrawn(tmp_path: Path) -> None:
    handoff = Handoff(tmp_path)
    handoff.expect()
    assert json.loads(handoff.path.read_text()) == ["pending", os.getpid()]
    handoff.expect()  # rewritten: one file, still held
    assert [p.name for p in tmp_path.iterdir()] == [handoff.path.name]
    assert ShmStaging(tmp_path).removed == 0
    handoff.withdraw()
    assert list(tmp_path.iterdir()) == []
