"""The vLLM engine's /dev/shm staging files: one killed with its rollout is removed by the next rollout.

On Kubernetes /dev/shm is the pod's memory-backed emptyDir and outlives a container the OOM killer
ended; these tests kill a real process holding a staging file with SIGKILL, as that does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from rollout_side.engines.shm_staging import ShmStaging

HOLDER = """
import sys, time
from pathlib import Path
from rollout_side.engines.shm_staging import ShmStaging
staging = ShmStaging(Path(sys.argv[1]))
flat = staging.allocate(1 << 20)
flat.fill_(7)
print("ready", flush=True)
time.sleep(600)
"""


def _holder(directory: Path) -> subprocess.Popen[str]:
    """A process that stages 1 MiB in `directory` and holds it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_a_staging_file_left_by_a_killed_rollout_is_removed_and_live_ones_are_kept(tmp_path: Path) -> None:
    killed, alive = _holder(tmp_path), _holder(tmp_path)
    try:
        killed_files = {p for p in tmp_path.iterdir() if p.name.startswith(f"weightsync-{killed.pid}-")}
        alive_files = {p for p in tmp_path.iterdir() if p.name.startswith(f"weightsync-{alive.pid}-")}
        assert len(killed_files) == len(alive_files) == 1
        killed.send_signal(signal.SIGKILL)  # no finaliser runs: the file stays, as after the OOM killer
        killed.wait(30)
        assert all(p.exists() for p in killed_files)
        unrelated = [tmp_path / "weightsync-1-0123456789ab-handoff.json", tmp_path / "weightsync-1-00ff.bin"]
        for path in unrelated:
            path.write_text("not a staging file")

        mine = ShmStaging(tmp_path)
        own = mine.allocate(4096)
        assert mine.removed == 1
        assert not any(p.exists() for p in killed_files)
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
