"""The processes a rollout's engine starts die with the process that started them (vllm_prewarm.die_with).

Real processes and the real kernel signal, without vLLM: a middle process (standing for the rollout, or
the fork server) starts a child that ties itself to it as EngineCore does (`watch_owner`, OWNER_ENV);
the middle is then SIGKILLed, as the OOM killer does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from rollout_side.engines.vllm_prewarm import OWNER_ENV

# The child: ties itself to the process OWNER_ENV names, says so, and waits to be killed.
CHILD = """
from rollout_side.engines.vllm_prewarm import watch_owner
import time
watch_owner()
print("tied", flush=True)
time.sleep(600)
"""
# The middle: starts the child with OWNER_ENV = sys.argv[1] ("self": its own pid), relays its output.
MIDDLE = """
import os, subprocess, sys, time
owner = str(os.getpid()) if sys.argv[1] == "self" else sys.argv[1]
child = subprocess.Popen([sys.executable, "-c", sys.argv[2]], env={**os.environ, sys.argv[3]: owner})
print(child.pid, flush=True)
time.sleep(600)
"""
GONE_WITHIN = 1.0


def _start(owner: str) -> tuple[subprocess.Popen[str], psutil.Process]:
    middle = subprocess.Popen(
        [sys.executable, "-c", MIDDLE, owner, CHILD, OWNER_ENV], stdout=subprocess.PIPE, text=True
    )
    assert middle.stdout is not None
    child = psutil.Process(int(middle.stdout.readline()))
    return middle, child


def _alive(process: psutil.Process) -> bool:
    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _gone(process: psutil.Process, within: float = GONE_WITHIN) -> bool:
    """Whether `process` has exited within `within` seconds."""
    deadline = time.monotonic() + within
    while _alive(process) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not _alive(process)


def _wait_tied(middle: subprocess.Popen[str]) -> None:
    assert middle.stdout is not None
    assert middle.stdout.readline().strip() == "tied"


def test_a_child_dies_within_a_second_of_its_owner() -> None:
    middle, child = _start("self")
    try:
        _wait_tied(middle)
        middle.kill()
        middle.wait(30)
        assert _gone(child), f"the child outlived its owner by {GONE_WITHIN} s"
    finally:
        middle.kill()
        if _alive(child):
            child.kill()


def test_a_child_whose_owner_died_before_it_was_tied_goes_at_once() -> None:
    """The race a parent-death signal leaves: the owner exited before prctl ran in the child."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(30)
    middle, child = _start(str(gone.pid))  # names an owner that is no longer running
    try:
        assert _gone(child, within=30), "the orphan runs on"  # it killed itself once its start was done
    finally:
        middle.kill()
        middle.wait(30)
        if _alive(child):
            child.kill()


def test_an_owner_inherited_from_further_up_is_not_followed() -> None:
    """OWNER_ENV naming a live process that is not the parent (leaked through a launcher) ties nothing."""
    middle, child = _start(str(os.getpid()))
    try:
        _wait_tied(middle)
        middle.kill()
        middle.wait(30)
        time.sleep(GONE_WITHIN)
        assert _alive(child), "a child killed itself for an owner that was never its parent"
    finally:
        middle.kill()
        if _alive(child):
            child.kill()
