"""vLLM's EngineCore process forked from a pre-warmed server instead of a fresh interpreter (CPU builds).

vLLM's CPU platform starts EngineCore with multiprocessing's "spawn": a new interpreter that imports
vLLM and torch again (about 5 s on two cores) after the rollout process has finished importing them
itself, so the two imports run one after the other. Here a fork server is started at launch and imports
EngineCore's modules on the other core while the rollout imports its own; EngineCore is then forked from
it, ready at once. The fork server is single-threaded and has run nothing but imports, which is what
makes forking it safe where forking the rollout (gRPC threads, OpenMP) would not be.

vLLM sets environment variables for its child just before starting it; a fork server's children would
otherwise see the server's environment from when it started, so each child takes its parent's at start().
GPU builds fork EngineCore already (vLLM's default there) and are left alone.

However it was started, EngineCore dies with its rollout (`die_with`, a parent-death signal): vLLM's
own does not notice (a spawned one was still running 48 s after a SIGKILL of its rollout), and on a GPU
an orphan holds the memory the restarted rollout needs. Each process in the chain (rollout, fork server,
EngineCore, vLLM's workers) is tied to the one that started it, so killing the rollout takes all down.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from multiprocessing import context, forkserver
from typing import Any

__all__ = ["OFF_ENV", "OWNER_ENV", "die_with", "install", "own_engine_processes", "running", "start", "watch_owner"]

logger = logging.getLogger(__name__)

# What EngineCore imports before it can build the model: done in the fork server, once. The first
# import ties the fork server itself to the rollout (vllm_forkserver.py).
OFF_ENV = "WEIGHTSYNC_VLLM_PREWARM"  # "0": vLLM's own spawn (bench.vllm_boot measures the difference)
# The pid of the process that started this one, which it dies with: set by the rollout before it starts
# its engine's processes, then by each of those, once tied, for the processes it starts in turn.
OWNER_ENV = "WEIGHTSYNC_ENGINE_OWNER"
PRELOAD = [
    "rollout_side.engines.vllm_forkserver",
    "vllm.v1.engine.core",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.worker.cpu_worker",
]
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class _Process(context.ForkServerProcess):
    """A fork-server child that runs with its parent's environment as of start(), not the server's, and
    dies with the fork server, its parent (which dies with the rollout)."""

    _environ: dict[str, str]

    def start(self) -> None:
        self._environ = dict(os.environ)
        super().start()

    def run(self) -> None:
        server = os.environ.get(OWNER_ENV, "")  # the fork server's pid (watch_owner set it there)
        os.environ.clear()
        os.environ.update(self._environ)
        if server:
            os.environ[OWNER_ENV] = server
        watch_owner()
        super().run()


def own_engine_processes() -> None:
    """Called in the rollout before vLLM starts EngineCore: names this process its owner, for all three
    ways it may start (forked by vLLM, as on GPUs; spawned; from the fork server)."""
    global _hooked
    os.environ[OWNER_ENV] = str(os.getpid())
    if not _hooked:
        os.register_at_fork(after_in_child=watch_owner)  # a forked child loads no plugin: vLLM did already
        _hooked = True


def watch_owner() -> None:
    """In a process started by the one OWNER_ENV names, dies with it (see `die_with`), and names itself
    the owner of the processes it starts in turn.

    Runs in a child the rollout forked, in the fork server and its children, and from weightsync's vLLM
    plugin (vllm_plugin.py), which vLLM loads in every process it spawns; in the owner itself it does nothing.
    """
    owner = os.environ.get(OWNER_ENV, "")
    if owner.isdigit() and int(owner) != os.getpid():
        die_with(int(owner))
        os.environ[OWNER_ENV] = str(os.getpid())


_hooked = False


def die_with(parent: int) -> None:
    """Has the kernel SIGKILL this process as soon as `parent`, the process that started it, exits.

    SIGKILL, not SIGTERM: vLLM defers SIGTERM while its engine is built, then shuts down for seconds,
    and nothing is left to save once the rollout is gone. If `parent` exited before the signal was set
    (this process was re-parented already), it goes now; if `parent` runs but is not this process's
    parent, OWNER_ENV was inherited from further up and this process is left alone. The signal follows
    the parent's thread that started this process, so processes are started from threads that live as
    long as their process.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("cannot tie process %d to its parent: %s", os.getpid(), os.strerror(ctypes.get_errno()))
        return
    if os.getppid() != parent:
        if running(parent):
            libc.prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)
            return
        os.kill(os.getpid(), signal.SIGKILL)


def running(pid: int) -> bool:
    """Whether `pid` runs: exists and is not a zombie (exited, not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except ProcessLookupError:
        return False
    except OSError:
        return True  # no /proc: existing is all we can tell


class _Context(context.ForkServerContext):
    Process = _Process


_context = _Context()
_started = False


def start() -> None:
    """Starts the fork server, which imports in the background (call early, once the environment is set,
    from the thread that lives as long as the rollout: the fork server dies with it, see `die_with`)."""
    global _started
    if _started or os.environ.get(OFF_ENV) == "0":
        return
    os.environ[OWNER_ENV] = str(os.getpid())
    _context.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()  # spawns it and returns: the imports run there
    _started = True


def install() -> bool:
    """Makes vLLM start EngineCore from the fork server; False (vLLM's own start) if its layout differs."""
    if not _started:
        return False
    try:
        from vllm.v1.engine import utils
    except ImportError:
        return False
    if not callable(getattr(utils, "get_mp_context", None)):
        logger.warning("this vLLM starts EngineCore differently: not using the pre-warmed fork server")
        return False

    def get_mp_context() -> Any:
        return _context

    utils.get_mp_context = get_mp_context
    return True
